"""Data the fleet simulator and its policies exchange: zones, prices, startup phases, replica
views, the state a policy sees and the decisions it returns. Plain frozen data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ReplicaKind(StrEnum):
    """How a replica's node is bought."""

    SPOT = "spot"
    ON_DEMAND = "on_demand"
    COMMITTED = "committed"


class Phase(StrEnum):
    """Where a replica is in its life: requested -> provisioning -> image pull -> weight load
    -> ready, then (for spot) noticed -> gone, or released by the policy."""

    PROVISIONING = "provisioning"
    IMAGE_PULL = "image_pull"
    WEIGHT_LOAD = "weight_load"
    READY = "ready"
    NOTICED = "noticed"


@dataclass(frozen=True)
class StartupPhases:
    """Seconds each startup phase takes; their sum is the cold start."""

    provision_s: float = 60.0
    image_pull_s: float = 30.0
    weight_load_s: float = 30.0

    @property
    def cold_start_s(self) -> float:
        return self.provision_s + self.image_pull_s + self.weight_load_s

    def with_cold_start(self, seconds: float) -> StartupPhases:
        """The same phase shares, scaled so that they sum to ``seconds``."""
        total = self.cold_start_s
        if total <= 0:
            return StartupPhases(provision_s=seconds, image_pull_s=0.0, weight_load_s=0.0)
        k = seconds / total
        return StartupPhases(self.provision_s * k, self.image_pull_s * k, self.weight_load_s * k)


@dataclass(frozen=True)
class Zone:
    """A zone and what one replica costs there per hour."""

    name: str
    spot_per_hour: float
    on_demand_per_hour: float


@dataclass(frozen=True)
class FleetSpec:
    """Everything about the fleet except the capacity trace, the target and the policy.

    ``committed_replicas`` nodes are paid for the whole horizon at ``committed_per_hour``
    whether used or not. ``warm_start``: replicas launched at t=0 are ready at t=0, so a fleet
    is measured in steady state and on-demand only scores exactly 100% at cost 1.0.
    """

    zones: tuple[Zone, ...]
    tick_seconds: float
    spot_startup: StartupPhases = StartupPhases()
    on_demand_startup: StartupPhases = StartupPhases()
    preemption_notice_s: float = 120.0
    on_demand_available: bool = True
    committed_replicas: int = 0
    committed_per_hour: float = 0.0
    warm_start: bool = True

    @property
    def zone_names(self) -> tuple[str, ...]:
        return tuple(z.name for z in self.zones)

    @property
    def reference_on_demand_per_hour(self) -> float:
        """The cheapest on-demand price: the all-on-demand baseline costs are relative to."""
        return min(z.on_demand_per_hour for z in self.zones)


@dataclass(frozen=True)
class ReplicaView:
    """One live replica as a policy sees it (times in seconds since the start)."""

    replica_id: int
    kind: ReplicaKind
    zone: str
    launched_s: float
    ready_at_s: float
    phase: Phase
    ends_at_s: float | None = None  # set once noticed: when the node goes away

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def is_noticed(self) -> bool:
        return self.phase is Phase.NOTICED


@dataclass(frozen=True)
class Preempted:
    """A spot replica got its preemption notice (it serves until ``ends_at_s``)."""

    replica_id: int
    zone: str
    ends_at_s: float


@dataclass(frozen=True)
class LaunchFailed:
    """No zone of the launch had capacity."""

    kind: ReplicaKind
    zones: tuple[str, ...]


@dataclass(frozen=True)
class Launched:
    """A launch got a node in ``zone``."""

    replica_id: int
    kind: ReplicaKind
    zone: str


@dataclass(frozen=True)
class BecameReady:
    """A replica finished its cold start."""

    replica_id: int
    zone: str


Event = Preempted | LaunchFailed | Launched | BecameReady


@dataclass(frozen=True)
class FleetState:
    """What a policy sees at one decision point. Time and prices come in here: a policy never
    reads a clock or a catalog."""

    tick: int
    now_s: float
    tick_seconds: float
    target_replicas: int
    zones: tuple[Zone, ...]
    replicas: tuple[ReplicaView, ...]
    events: tuple[Event, ...] = ()
    spot_cold_start_s: float = 0.0
    on_demand_cold_start_s: float = 0.0
    preemption_notice_s: float = 0.0
    committed_replicas: int = 0
    on_demand_available: bool = True
    round: int = 0  # >0: a retry within the same tick; ``events`` are this tick's results

    def of_kind(self, kind: ReplicaKind) -> list[ReplicaView]:
        return [r for r in self.replicas if r.kind is kind]


@dataclass(frozen=True)
class Launch:
    """Ask for one replica of ``kind``. For spot, ``zones`` is a failover list tried in order
    (the first zone with capacity wins); on-demand and committed use the first zone."""

    kind: ReplicaKind
    zones: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Terminate:
    """Release a replica now (billing stops now)."""

    replica_id: int


Action = Launch | Terminate
