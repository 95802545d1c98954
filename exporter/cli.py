"""Command line, wiring and signals.

Flags follow Prometheus' conventions and win over the config file. SIGTERM/SIGINT stop
gracefully (in-flight responses finish, NVML is shut down, exit 0); SIGHUP reloads the config
file, keeping the old configuration if the new one is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from exporter import __version__, logs
from exporter.attribution import KubeletPods, ProcAttribution
from exporter.collectors import COLLECTORS, Services, enabled_collectors
from exporter.config import (
    DEFAULT_LISTEN_ADDRESS,
    Config,
    KnownNames,
    Overrides,
    apply_overrides,
    load_config,
)
from exporter.nvml import DEVICE_CALLS, Driver
from exporter.nvml.pynvml_driver import PynvmlDriver
from exporter.podresources import PodResourcesWatcher
from exporter.sampler import Sampler
from exporter.simulate.attribution import SimulatedAttribution
from exporter.simulate.driver import SimulatedDriver, fleet_description
from exporter.validation import ConfigError
from exporter.web import WebServer
from exporter.webconfig import WebSecurity
from exporter.workload import Attribution

log = logging.getLogger("exporter")

EXIT_CONFIG = 2
# Graceful stop must fit in the 5 s most orchestrators wait before SIGKILL... with margin.
HTTP_GRACE_SECONDS = 2.5
SAMPLER_GRACE_SECONDS = 1.5
# What a configuration file may name of the collectors and of the driver's calls.
KNOWN_NAMES = KnownNames(collectors=tuple(COLLECTORS), device_calls=DEVICE_CALLS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvml-exporter",
        description="Prometheus exporter for NVIDIA GPUs, sampling NVML in the background.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="PATH",
        help="YAML configuration file (default: built-in defaults)",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the configuration and exit (0 valid, 2 invalid)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN_ADDRESS})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="exporter-toolkit web configuration: TLS, client certificates, basic auth",
    )
    parser.add_argument(
        "--web.max-requests",
        dest="max_requests",
        metavar="N",
        type=int,
        help="requests in flight beyond this get 503 (default 40)",
    )
    parser.add_argument(
        "--sampling.interval",
        dest="interval",
        metavar="DURATION",
        help="how often NVML is read, e.g. 1s or 500ms (default 1s)",
    )
    parser.add_argument(
        "--naming",
        dest="naming",
        metavar="SCHEME",
        help="metric names: nvml (default) or dcgm (dcgm-exporter compatible)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        metavar="LEVEL",
        help="debug, info, warn or error (default info)",
    )
    parser.add_argument(
        "--log.format", dest="log_format", metavar="FORMAT", help="logfmt or json (default logfmt)"
    )
    parser.add_argument(
        "--simulate",
        dest="simulate",
        metavar="N",
        nargs="?",
        const=8,
        type=int,
        help="serve a simulated fleet of N GPUs (default 8) instead of real NVML",
    )
    for name, cls in COLLECTORS.items():
        state = "on" if cls.default_enabled else "off"
        parser.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"enable the {name} collector (default {state})",
        )
    parser.add_argument("--version", action="version", version=f"nvml-exporter {__version__}")
    return parser


def _normalise_no_flags(argv: Sequence[str]) -> list[str]:
    """Also accepts `--collector.X=true|false`, as some Prometheus exporters do."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if sep and name.startswith("--collector.") and value.lower() in ("false", "true"):
            out.append(name if value.lower() == "true" else "--no-" + name[2:])
        else:
            out.append(arg)
    return out


def overrides_from(args: argparse.Namespace) -> Overrides:
    if args.simulate is not None and not 1 <= args.simulate <= 64:
        raise ConfigError(f"--simulate: must be between 1 and 64, got {args.simulate}")
    collectors = {
        name: value
        for name in COLLECTORS
        if (value := getattr(args, f"collector_{name}")) is not None
    }
    return Overrides(
        listen_address=args.listen_address,
        web_config_file=args.web_config_file,
        max_requests=args.max_requests,
        log_level=args.log_level,
        log_format=args.log_format,
        interval=args.interval,
        naming=args.naming,
        simulate=args.simulate,
        collectors=collectors,
    )


def load(args: argparse.Namespace) -> Config:
    return apply_overrides(load_config(args.config_file, known=KNOWN_NAMES), overrides_from(args))


def start_pod_watcher(config: Config) -> PodResourcesWatcher | None:
    if not config.kubernetes.enabled:
        return None
    k8s = config.kubernetes
    watcher = PodResourcesWatcher(k8s.socket, interval=k8s.interval, timeout=k8s.timeout)
    watcher.start()
    return watcher


def make_services(config: Config, driver: Driver, watcher: PodResourcesWatcher | None) -> Services:
    """What collectors need besides NVML: who runs on the GPUs, real or simulated as the driver."""
    pods = KubeletPods(watcher) if watcher is not None else None
    attribution: Attribution
    if isinstance(driver, SimulatedDriver):
        attribution = SimulatedAttribution(driver, config.simulation.seed)
    else:
        attribution = ProcAttribution(config.processes.proc_root)
    return Services(attribution, pods)


def make_driver(config: Config) -> Driver:
    if config.backend == "simulated":
        return SimulatedDriver(config.simulation)
    return PynvmlDriver()


class App:
    def __init__(
        self,
        args: argparse.Namespace,
        config: Config,
        sampler: Sampler,
        security: WebSecurity | None,
        driver: Driver,
        watcher: PodResourcesWatcher | None,
    ) -> None:
        self.args = args
        self.config = config
        self.sampler = sampler
        self.security = security
        self.driver = driver
        self.watcher = watcher
        self.stopping = asyncio.Event()

    def reload(self) -> None:
        try:
            new = load(self.args)
        except ConfigError as err:
            self.sampler.reload_successful = False
            log.error(
                "configuration reload failed; keeping the running configuration",
                extra={"reason": str(err)},
            )
            return
        restart_only = [
            key
            for key, old_value, new_value in (
                ("web", self.config.web, new.web),
                ("backend", self.config.backend, new.backend),
                ("simulation", self.config.simulation, new.simulation),
            )
            if old_value != new_value
        ]
        if restart_only:
            log.warning(
                "configuration changes that take effect only after a restart",
                extra={"keys": ",".join(restart_only)},
            )
            new = dataclasses.replace(
                new,
                web=self.config.web,
                backend=self.config.backend,
                simulation=self.config.simulation,
            )
        services = None
        changed = [
            key
            for key, old_value, new_value in (
                ("kubernetes", self.config.kubernetes, new.kubernetes),
                ("processes.proc_root", self.config.processes.proc_root, new.processes.proc_root),
            )
            if old_value != new_value
        ]
        if changed:
            # The pod watcher and the process attribution are rebuilt from the new settings and
            # handed to the collectors with the rest of the configuration.
            watcher = self.watcher
            if "kubernetes" in changed:
                watcher = start_pod_watcher(new)
                if self.watcher is not None:
                    # Stopping waits for a poll in flight: not on the event loop.
                    threading.Thread(target=self.watcher.stop, name="podresources-stop").start()
                self.watcher = watcher
            services = make_services(new, self.driver, watcher)
        logs.setup(new.log.level, new.log.format)
        self.sampler.reconfigure(new, services)
        self.sampler.reload_successful = True
        self.sampler.reload_timestamp = time.time()
        self.config = new
        log.info(
            "configuration reloaded",
            extra={"source": new.source, "rebuilt": ",".join(changed) or "-"},
        )

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: a signal during start-up must not kill the process uncleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.sampler.start()
        # Binding after the first sample lets the first scrape see real data; a sick GPU
        # cannot hold this up for longer than one sample deadline.
        give_up = loop.time() + self.config.sampling.deadline + 1
        while not (self.sampler.has_sampled() or self.stopping.is_set()) and loop.time() < give_up:
            await asyncio.sleep(0.01)
        server = WebServer(self.sampler, self.config.web, self.config.backend, self.security)
        if not self.stopping.is_set():
            try:
                await server.start()
            except OSError as err:
                log.error(
                    "cannot listen",
                    extra={
                        "address": self.config.web.listen_address,
                        "reason": err.strerror or str(err),
                    },
                )
                await loop.run_in_executor(None, self.sampler.stop, SAMPLER_GRACE_SECONDS)
                return 1
            await self.stopping.wait()
        log.info("shutting down")
        # Both in parallel, so the whole stop fits the 5 s orchestrators allow.
        sampler_stopped = loop.run_in_executor(None, self.sampler.stop, SAMPLER_GRACE_SECONDS)
        await server.close(HTTP_GRACE_SECONDS)
        if not await sampler_stopped:
            log.warning("an NVML call was still running; exiting without nvmlShutdown")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_no_flags(sys.argv[1:] if argv is None else argv))
    try:
        config = load(args)
        # Before the web config is read: what it warns about (a certificate near or past its
        # end) goes out in the configured format and level, like every other line.
        logs.setup(config.log.level, config.log.format)
        # Certificates and users are checked before a port is bound, like the rest.
        security = WebSecurity(config.web.config_file) if config.web.config_file else None
    except ConfigError as err:
        print(f"nvml-exporter: invalid configuration: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_check:
        print(f"nvml-exporter: configuration is valid ({config.source})")
        return 0
    if config.backend == "simulated":
        log.warning(
            "serving a SIMULATED fleet, not real GPUs",
            extra={"fleet": fleet_description(config.simulation)},
        )
    log.info(
        "starting",
        extra={
            "version": __version__,
            "config": config.source,
            "interval": f"{config.sampling.interval:g}s",
            "collectors": ",".join(enabled_collectors(config.collectors)),
        },
    )
    # The event loop serving scrapes waits less for the GIL behind the sampler's threads.
    sys.setswitchinterval(0.001)
    driver = make_driver(config)
    watcher = start_pod_watcher(config)
    sampler = Sampler(config, driver, services=make_services(config, driver, watcher))
    sampler.web_status = security
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # full passes, each of which would stall the sampler for as long as it walks them.
    gc.freeze()
    return asyncio.run(App(args, config, sampler, security, driver, watcher).serve())
