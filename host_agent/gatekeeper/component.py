"""The daemon's egress gatekeeper: the BPF gate on the sandbox's cgroup tree, the sandbox's resolver and,
in the `proxy` and `both` enforcement modes, the L7 forwarder that TCP connections are sent through.

The gate is attached at the machine's cgroup v2 root, not at the agent's slice: restarting a slice
removes its directory and every program attached to it (measured), while the root lives as long as the
machine. Everything under the root is gated, the machine's own services and PID 1 included, except
this daemon's own cgroup, the operator's slice (`km shell --root`), first boot until it has finished,
and on EC2 the few services the machine needs (host_agent/containment.py). Root in the agent's units
cannot move a process into any of them: cgroupfs is read-only there and PID 1 starts no units for it.

Fail closed: programs stay attached when the daemon exits, and DNS then goes to a resolver that is no
longer there. A restarted daemon attaches fresh programs in place of the old ones (no gap) and takes
over the maps pinned in PIN_DIR, so what was learned stays reachable; if the allowlist changed while no
daemon ran, the learned entries are revoked instead. Nothing is ever more open than before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host_agent import containment
from host_agent.config import HostAgentConfig, SandboxIdentity
from host_agent.gatekeeper.allow_table import AllowTable, IPAddress, never_learned
from host_agent.gatekeeper.connections import open_remote_addresses
from host_agent.gatekeeper.names import NamePolicy
from host_agent.gatekeeper.resolver import QueryRecord, Resolver
from host_agent.paths import OTLP_RECEIVER_PORT, STATE_DIR
from host_agent.upstream import nameservers, parse_upstream

if TYPE_CHECKING:  # imported when a proxy mode needs it: asyncio and the forwarder cost ~80 ms of start-up
    from ebpf.gate import GateEvent
    from host_agent.gatekeeper.proxy import L7Proxy, ProxyDecision
    from host_agent.telemetry.buffered import BufferedEvents

log = logging.getLogger("km-host-agent.gate")
# Where systemd puts a machine service's cgroup (units name no other slice).
SERVICES_SLICE = "system.slice"
# Written `ready` (or `failed …`) by userdata when first boot is over: then its unit is gated too.
BOOT_STATUS = Path("/var/lib/km/boot-status")
RESOLV_CONF = Path("/etc/resolv.conf")
LEARN_REPORT = STATE_DIR / "learn-report.json"
# The gate's maps live on a bpffs here, so a restarted daemon takes over what the sandbox had learned;
# the allowlist they were learned under is recorded beside the daemon's state.
PIN_DIR = Path("/run/kmgate")  # run-kmgate.mount
POLICY_RECORD = STATE_DIR / "gate-policy.json"
# Fixed ports on the machine's loopback: the gate is configured with them before the resolver and the
# forwarder bind, and the daemon holds them from boot, before any agent could take them.
RESOLVER_PORT = 10053
PROXY_PORT = 10080
# DNS answers left closed for their range (DNS rebinding), kept to explain the denials that follow: the
# most recent this many addresses.
MAX_REFUSED_ANSWERS = 256


class GateError(Exception):
    """The gate could not be set up; the daemon refuses to report ready without it."""


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """Where cgroup v2 is mounted in this machine (`/sys/fs/cgroup/unified` on hybrid hosts)."""
    for line in mountinfo.read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return Path(before.split()[4])
    raise GateError("no cgroup2 mount in this machine: the egress gate needs cgroup v2")


def is_bpffs(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether a bpffs is mounted at `path` (pins anywhere else would fail or not survive)."""
    for line in mountinfo.read_text().splitlines():
        before, _, after = line.partition(" - ")
        if before.split()[4] == str(path) and after.split(" ", 1)[0] == "bpf":
            return True
    return False


def own_cgroup(cgroup_root: Path, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path | None:
    """This process's cgroup v2 directory when it lies strictly below `cgroup_root` (never the root itself,
    which would exempt everything)."""
    for line in proc_cgroup.read_text().splitlines():
        hierarchy, _, relative = line.split(":", 2)
        if hierarchy == "0" and relative.strip("/"):
            return cgroup_root / relative.strip("/")
    return None


def exempt_cgroups(cgroup_root: Path, substrate: str, *, first_boot_done: bool, daemon_cgroup: Path | None) -> list[Path]:
    """The cgroups the gate leaves alone right now (only those that exist: ids are taken from directories)."""
    wanted = [cgroup_root / containment.OPERATOR_SLICE]
    if daemon_cgroup is not None:
        wanted.append(daemon_cgroup)
    wanted += [cgroup_root / SERVICES_SLICE / unit for unit in containment.exempt_unit_names(substrate, first_boot_done)]
    return [path for path in dict.fromkeys(wanted) if path.is_dir()]


def first_boot_finished(status_file: Path = BOOT_STATUS) -> bool:
    """First boot has ended (successfully or not) once userdata wrote something other than `running`."""
    try:
        status = status_file.read_text().strip()
    except OSError:
        return False
    return bool(status) and status != "running"


# systemd-resolved's stub listeners, and the file where it lists the servers it forwards to.
RESOLVED_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})
RESOLVED_UPLINK = Path("/run/systemd/resolve/resolv.conf")


def upstream_from_resolv_conf(path: Path = RESOLV_CONF, resolved_uplink: Path = RESOLVED_UPLINK) -> tuple[str, int]:
    """The first nameserver of resolv.conf, never resolved's stub: forwarding there would make resolved,
    not this daemon, the sandbox's resolver. First boot masks resolved and writes its upstream into
    resolv.conf; before that, behind the stub, the upstream is the first server resolved forwards to."""
    named = _nameservers(path)
    if path.is_symlink() or RESOLVED_STUBS.intersection(named):
        named += _nameservers(resolved_uplink)
    for address in named:
        if address not in RESOLVED_STUBS:
            return parse_upstream(address)
    raise GateError(f"no nameserver in {path} other than systemd-resolved's stub: set KM_DNS_UPSTREAM in /etc/km/sandbox.env")


def _nameservers(path: Path) -> list[str]:
    try:
        return nameservers(path.read_text())
    except OSError:  # a link to resolved's stub file while resolved is not running
        return []


class Gatekeeper:
    def __init__(
        self,
        config: HostAgentConfig,
        identity: SandboxIdentity,
        cgroup_root: Path,
        learn_report: Path = LEARN_REPORT,
        pin_dir: Path | None = PIN_DIR,
        policy_record: Path = POLICY_RECORD,
        events: BufferedEvents | None = None,
        boot_status: Path = BOOT_STATUS,
        daemon_cgroup: Path | None = None,
    ):
        """`daemon_cgroup`: this daemon's own cgroup, exempt (the daemon passes it; tests leave it out)."""
        self.config = config
        self.events = events  # telemetry: DNS answers and denials, when the daemon has it
        self.identity = identity
        self.cgroup_root = cgroup_root
        self.learn_report = learn_report
        self.pin_dir = pin_dir
        self.policy_record = policy_record
        self.boot_status = boot_status
        self.daemon_cgroup = daemon_cgroup
        self._exempt_ids: set[int] = set()
        self._exempt_paths: list[Path] = []
        self.decisions: Counter[str] = Counter()
        self.learned: dict[str, dict[str, Any]] = {}
        self.refused_answers: OrderedDict[str, dict[str, Any]] = OrderedDict()  # address -> name, range, denials
        self._learn_dirty = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.gate: Any = None
        self.resolver: Resolver | None = None
        self.proxy: L7Proxy | None = None
        self.upstream: tuple[str, int] | None = None
        self.table: AllowTable | None = None
        self.policy = NamePolicy.from_lists(config.egress.allowed_dns_suffixes, config.egress.allowed_hosts)

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        from ebpf.gate import EgressGate

        egress = self.config.egress
        upstream = parse_upstream(self.identity.dns_upstream) if self.identity.dns_upstream else upstream_from_resolv_conf()
        self.upstream = upstream
        pid_ns = os.stat("/proc/self/ns/pid")
        self.gate = EgressGate(
            resolver_v4=("127.0.0.1", RESOLVER_PORT),
            resolver_v6=("::1", RESOLVER_PORT),
            mode=egress.mode,
            audit_allows=egress.mode == "log",
            pidns=(pid_ns.st_dev, pid_ns.st_ino),
            enforcement=egress.enforcement,
            proxy_v4=("127.0.0.1", PROXY_PORT),
            proxy_v6=("::1", PROXY_PORT),
            pin_dir=self._usable_pin_dir(),
            daemon_ports=(RESOLVER_PORT, PROXY_PORT, OTLP_RECEIVER_PORT),  # nobody gated may stand in for them
        )
        self.table = AllowTable(self.gate, is_in_use=open_remote_addresses)
        self._adopt_pinned_entries()
        # Before binding anything: a restarted daemon has a new cgroup, and the programs a previous daemon
        # left attached would refuse it the resolver's and forwarder's ports until it is exempt again.
        exempt = self._refresh_exempt()
        self.policy = NamePolicy.from_lists(egress.allowed_dns_suffixes, egress.allowed_hosts)
        self.resolver = Resolver(
            self._resolver_policy(),
            upstream,
            self.table,
            listen=(("127.0.0.1", RESOLVER_PORT), ("::1", RESOLVER_PORT)),
            on_query=self._on_query,
        )
        self.resolver.start()
        if egress.enforcement != "ebpf":
            self._start_proxy()
        self.table.set_static(egress.allowed_cidrs)
        self.gate.attach(self.cgroup_root)
        threading.Thread(target=self._read_events, name="gate-events", daemon=True).start()
        log.info(
            "egress gate attached",
            extra={
                "fields": {
                    "cgroup": str(self.cgroup_root),
                    "mode": egress.mode,
                    "enforcement": egress.enforcement,
                    "resolver_port": self.resolver.port,
                    "upstream": f"{upstream[0]}:{upstream[1]}",
                    "exempt": [str(path) for path in exempt],
                }
            },
        )

    def _refresh_exempt(self) -> list[Path]:
        """Write the exempt cgroups' ids to the gate when they changed; returns the exempt directories."""
        from ebpf.kernel_ids import cgroup_id

        exempt = exempt_cgroups(
            self.cgroup_root,
            self.config.substrate,
            first_boot_done=first_boot_finished(self.boot_status),
            daemon_cgroup=self.daemon_cgroup,
        )
        ids: set[int] = set()
        for path in exempt:
            try:
                ids.add(cgroup_id(path))
            except OSError:  # gone between the listing and the stat: not exempt, which is the safe side
                continue
        if ids != self._exempt_ids:
            self.gate.set_exempt(ids)
            if self._exempt_ids:
                log.info("gate exemptions changed", extra={"fields": {"exempt": [str(path) for path in exempt]}})
            self._exempt_ids = ids
        self._exempt_paths = exempt
        return exempt

    def _usable_pin_dir(self) -> Path | None:
        """The bpffs directory for the maps (run-kmgate.mount); None, and maps that start empty, without it."""
        if self.pin_dir is None:
            return None
        if not is_bpffs(self.pin_dir):
            fields = {"path": str(self.pin_dir)}
            log.warning("no bpffs for the gate's maps; a restart will start them empty", extra={"fields": fields})
            return None
        return self.pin_dir

    def _adopt_pinned_entries(self) -> None:
        """Keep what the previous daemon learned, unless the allowlist changed while none was running."""
        assert self.table is not None
        if self.gate.discarded:
            log.warning(
                "the pinned gate maps had another layout; started empty", extra={"fields": {"reason": self.gate.discarded}}
            )
        fingerprint = self._policy_fingerprint()
        if self.gate.adopted:
            try:
                same_policy = self.policy_record.read_text() == fingerprint
            except OSError:
                same_policy = False
            revoked = self.table.adopt(self.gate.entries_by_kind(), keep_learned=same_policy)
            log.info(
                "took over the gate's pinned maps",
                extra={"fields": {"entries": len(self.gate.entries()), "revoked": len(revoked), "same_policy": same_policy}},
            )
        self._record_policy(fingerprint)

    def _policy_fingerprint(self) -> str:
        """What learned entries depend on: the names, and the mode (learn mode learns every name's addresses)."""
        egress = self.config.egress
        policy = {"suffixes": sorted(egress.allowed_dns_suffixes), "hosts": sorted(egress.allowed_hosts), "mode": egress.mode}
        return json.dumps(policy) + "\n"

    def _record_policy(self, fingerprint: str) -> None:
        self.policy_record.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.policy_record.with_name(f".{self.policy_record.name}.tmp")
        temporary.write_text(fingerprint)
        temporary.replace(self.policy_record)

    def reload(self, config: HostAgentConfig) -> None:
        """A new allowlist takes effect for new lookups and connections; open connections stay up.

        Narrowing it, or leaving learn mode (which learned every name's addresses), revokes everything
        learned, atomically with respect to queries in flight (AllowTable.clear_dynamic).
        """
        old, new = self.config.egress, config.egress
        self.config = config
        assert self.resolver is not None and self.table is not None
        resolver = self.resolver
        self.policy = NamePolicy.from_lists(new.allowed_dns_suffixes, new.allowed_hosts)
        self.table.set_static(new.allowed_cidrs)
        if new.mode != old.mode:
            self.gate.set_mode(new.mode)
            self.gate.set_audit_allows(new.mode == "log")
        if new.enforcement != old.enforcement:
            if new.enforcement != "ebpf":
                self._start_proxy()  # listening before the gate sends anything there
            self.gate.set_enforcement(new.enforcement)
        narrowed = not set(old.allowed_dns_suffixes) <= set(new.allowed_dns_suffixes) or not set(old.allowed_hosts) <= set(
            new.allowed_hosts
        )
        left_learn_mode = old.mode == "log" and new.mode != "log"
        if narrowed or left_learn_mode:  # addresses learned through a name no longer allowed must not stay reachable
            policy = self._resolver_policy()
            revoked = self.table.clear_dynamic(lambda epoch: resolver.set_policy(policy, epoch))
            reason = "learn mode ended" if left_learn_mode else "allowlist narrowed"
            log.info(f"{reason}; learned addresses revoked", extra={"fields": {"revoked": len(revoked)}})
        else:
            resolver.policy = self._resolver_policy()
        self._record_policy(self._policy_fingerprint())

    def _start_proxy(self) -> None:
        """The L7 forwarder the proxy modes send TCP to: it checks Host/SNI against the same allowlist."""
        if self.proxy is not None:
            return
        assert self.upstream is not None
        from host_agent.gatekeeper.proxy import L7Proxy, upstream_resolve

        self.proxy = L7Proxy(
            policy=lambda: self.policy,
            original_destination=lambda family, port: self.gate.proxy_origin(int(family), port),
            resolve=upstream_resolve(self.upstream),
            forbidden_target=self._forbidden_target,
            listen=(("127.0.0.1", PROXY_PORT), ("::1", PROXY_PORT)),
            on_decision=self._on_proxy_decision,
        )
        self.proxy.start()

    def _forbidden_target(self, address: IPAddress) -> bool:
        """Where the forwarder never connects for a name: where the resolver would not let the agent either."""
        return never_learned(address) or (self.table is not None and self.table.unreachable_range(address) is not None)

    def _resolver_policy(self) -> NamePolicy:
        """Learn mode answers every name (so the report shows what the agent needs) and records the verdict."""
        if self.config.egress.mode == "log":
            return NamePolicy.from_lists(["*"], [])
        return self.policy

    def tick(self) -> None:
        """Periodic work from the daemon's loop: follow exempt units that restarted (a new cgroup has a new
        id) and first boot ending, expire learned addresses, write the learn report."""
        if self.gate is not None:
            self._refresh_exempt()
        if self.table is not None:
            self.table.expire()
        if self._learn_dirty:
            self._write_learn_report()

    def stop(self) -> None:
        """Stop answering DNS; the programs stay attached (fail closed)."""
        self._stopping.set()
        if self.resolver is not None:
            self.resolver.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self._learn_dirty:
            self._write_learn_report()

    def status(self) -> dict[str, Any]:
        return {
            "enforcement": self.config.egress.enforcement,
            "mode": self.config.egress.mode,
            "attached_to": str(self.cgroup_root),
            "exempt": [str(path) for path in self._exempt_paths],
            "allow_entries": len(self.gate.entries()) if self.gate is not None else 0,
            "decisions": self.gate.counters() if self.gate is not None else {},
            "resolver": self.resolver.stats() if self.resolver is not None else {},
            "proxy": self.proxy.stats() if self.proxy is not None else None,
            "refused_answers": self._refused_answers(),
        }

    def _refused_answers(self) -> list[dict[str, Any]]:
        """Answers an allowed name gave that were left closed (private, loopback… ranges), newest last."""
        with self._lock:
            return [dict(entry) for entry in self.refused_answers.values()]

    # ---- audit and learn mode ---------------------------------------------------------------------
    def _on_query(self, record: QueryRecord) -> None:
        if record.refused:
            self._remember_refused(record)
        allowed = self.policy.allows(record.name)
        denied = not allowed and record.rcode == "NXDOMAIN" and not record.allowed
        if not allowed:
            message = "dns denied" if denied else "dns would be denied"
            log.warning(message, extra={"fields": {"name": record.name, "qtype": record.qtype}})
        if self.events is not None:
            decision = "allowed" if allowed else "denied" if denied else "would_deny"
            self.events.dns(
                name=record.name, qtype=record.qtype, decision=decision, rcode=record.rcode, addresses=record.addresses
            )
        if self.config.egress.mode == "log":
            with self._lock:
                entry = self.learned.setdefault(f"dns:{record.name}", {"kind": "dns", "name": record.name, "count": 0})
                entry["count"] += 1
                entry["allowed"] = allowed
                entry["addresses"] = sorted(set(entry.get("addresses", [])) | set(record.addresses))
                if record.refused:
                    refused = dict(entry.get("refused", {})) | {address: why for address, why in record.refused}
                    entry["refused"] = {address: refused[address] for address in sorted(refused)}
                self._learn_dirty = True

    def _remember_refused(self, record: QueryRecord) -> None:
        """Keep why these answers were not learned, so the denials they cause can say so (bounded)."""
        for address, why in record.refused:
            log.warning("dns answer not opened", extra={"fields": {"name": record.name, "address": address, "range": why}})
        with self._lock:
            for address, why in record.refused:
                entry = self.refused_answers.pop(address, {"denied_connects": 0})
                entry.update(address=address, name=record.name, reason=_refusal_text(why))
                self.refused_answers[address] = entry
            while len(self.refused_answers) > MAX_REFUSED_ANSWERS:
                self.refused_answers.popitem(last=False)

    def _on_proxy_decision(self, decision: ProxyDecision) -> None:
        fields = {
            "verdict": decision.verdict,
            "protocol": decision.protocol,
            "name": decision.name,
            "original": f"{decision.original[0]}:{decision.original[1]}" if decision.original else None,
            "target": f"{decision.target[0]}:{decision.target[1]}" if decision.target else None,
            "reason": decision.reason,
        }
        if decision.verdict == "allow":
            log.info("proxy forwarded", extra={"fields": fields})
        else:
            log.warning("proxy refused" if decision.verdict == "deny" else "proxy failed", extra={"fields": fields})

    def _read_events(self) -> None:
        while not self._stopping.is_set():
            try:
                events = self.gate.poll_events(500)
            except Exception:  # the ring buffer reader must never take the daemon down
                log.exception("reading gate events failed")
                time.sleep(1)
                continue
            for event in events:
                self._on_gate_event(event)

    def _on_gate_event(self, event: GateEvent) -> None:
        """Log and report one kernel decision; a denied connect to an answer left closed for its range says so."""
        self.decisions[event.verdict] += 1
        fields: dict[str, Any] = {
            "verdict": event.verdict,
            "address": event.address,
            "port": event.port,
            "proto": event.proto,
            "pid": event.pid,
            "uid": event.uid,
            "comm": event.comm,
        }
        if event.hook != "connect":
            fields["hook"] = event.hook
        if event.socket_type:
            fields["socket_type"] = event.socket_type
        denied = event.verdict in ("deny", "would-deny")
        if denied and event.hook == "connect":
            with self._lock:
                refused = self.refused_answers.get(event.address)
                if refused is not None:
                    refused["denied_connects"] += 1
                    fields.update(reason=refused["reason"], name=refused["name"])
        if denied:
            if event.hook == "socket":
                message = "socket of another protocol than TCP or UDP refused"
            elif event.hook == "bind":
                message = "bind of the daemon's port refused"
            else:
                message = "egress denied" if event.verdict == "deny" else "egress would be denied"
            log.warning(message, extra={"fields": fields})
            if self.events is not None:
                self.events.gate(
                    decision="denied" if event.verdict == "deny" else "would_deny",
                    address=event.address,
                    port=event.port,
                    protocol=event.proto,
                    pid=event.pid,
                    process=event.comm,
                )
        if self.config.egress.mode == "log":
            with self._lock:
                key = ":".join(filter(None, (event.hook, event.socket_type, event.proto, event.address, str(event.port))))
                entry = self.learned.setdefault(key, {"kind": event.hook, **fields, "count": 0})
                entry["count"] += 1
                if "reason" in fields:
                    entry.update(reason=fields["reason"], name=fields["name"])
                self._learn_dirty = True

    def _write_learn_report(self) -> None:
        with self._lock:
            report = {
                "sandbox_id": self.identity.sandbox_id,
                "profile": self.config.profile,
                "entries": list(self.learned.values()),
            }
            self._learn_dirty = False
        self.learn_report.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.learn_report.with_name(f".{self.learn_report.name}.tmp")
        temporary.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        temporary.replace(self.learn_report)


def _refusal_text(address_range: str) -> str:
    """Why an allowed name's answer stays closed, in the operator's words (learn report, status, logs)."""
    return (
        f"a DNS answer pointed at a {address_range} address, which names may not open (DNS rebinding); "
        "list it in network.allowedCIDRs to reach it"
    )
