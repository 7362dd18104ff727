"""Regression (found by bench/soak.py): each policy edit used to leave the merged rule view of the replaced policy in
the engine's view cache, keeping the old compiled policy alive until 1,024 edits had piled up."""

from __future__ import annotations

import gc
import ipaddress

from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import CompiledPolicy, Engine, EngineConfig
from egress_gateway.policy.model import ClusterEgressPolicy, EgressPolicy
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object

CLIENT = Identity("shop", labels={"app": "payments"})
PUBLIC = ipaddress.ip_address("93.184.216.7")


def _policy(name: str, hosts: list[str]) -> EgressPolicy | ClusterEgressPolicy:
    return validate_object(
        {
            "apiVersion": "egressgateway.io/v1alpha1",
            "kind": "EgressPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"rules": [{"name": "r", "hosts": hosts}]},
        }
    )


def test_policy_edits_do_not_keep_replaced_policies_alive() -> None:
    store = PolicyStore()
    engine = Engine(EngineConfig(default_allow=False))
    store.subscribe(lambda policies: setattr(engine, "policies", policies))
    store.upsert(_policy("stable", ["stable.example.com"]), "1")  # two policies: decisions use a merged view
    store.upsert(_policy("edited", ["edit-0.example.com"]), "1")
    store.mark_loaded()
    for edit in range(1, 60):
        assert engine.decide(Facts(CLIENT, "stable.example.com", 443, destination_ip=PUBLIC)).allowed
        store.upsert(_policy("edited", [f"edit-{edit}.example.com"]), str(edit + 1))
        assert engine.decide(Facts(CLIENT, f"edit-{edit}.example.com", 443, destination_ip=PUBLIC)).allowed
        assert not engine.decide(Facts(CLIENT, f"edit-{edit - 1}.example.com", 443, destination_ip=PUBLIC)).allowed
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, CompiledPolicy) and o.ref.name == "edited"]
    assert len(alive) <= 2, f"{len(alive)} versions of the edited policy are still referenced"
