"""Bad and malicious client updates: each is rejected with a reason naming the client, the round completes with
the others, and the result equals (bit for bit) aggregating the good clients alone.

Kinds of bad update tried (`BAD_KINDS`, one client each, all in the same round):
 1. id_not_string       client id is an int
 2. id_path_separator   client id "../evil/x" (path separators)
 3. id_traversal        client id "a..b"
 4. id_control_char     client id with a newline
 5. id_empty            empty client id
 6. id_too_long         200-character client id
 7. id_git_lock         client id ending in ".lock" (refused as a Hub branch name)
 8. duplicated_id       two updates under one id (impostor): both copies rejected
 9. not_enrolled        an id the server never enrolled
10. examples_zero       num_examples = 0
11. examples_negative   num_examples < 0
12. examples_float      num_examples = 5.0
13. examples_bool       num_examples = True
14. examples_over_declared  more examples than the client declared at enrolment
15. examples_over_cap   more examples than the recipe cap
16. state_not_mapping   state is a list
17. missing_key         a LoRA tensor missing
18. extra_key           an unknown tensor added
19. not_a_tensor        a numpy array instead of a tensor
20. wrong_shape         a tensor of the wrong shape
21. wrong_rank          a LoRA factor of twice the layout rank
22. dtype_float64       float64 instead of float32
23. dtype_float16       float16 instead of float32
24. dtype_integer       an int64 tensor
25. nan                 a NaN value
26. pos_inf             a +Inf value
27. one_neg_inf         a single -Inf among finite values
28. sparse              a sparse COO tensor
29. meta_device         a meta tensor (no values)
30. counts_shape        expert_counts of the wrong shape
31. counts_float        float expert_counts
32. counts_bool         bool expert_counts
33. counts_negative     a negative token count
34. counts_over_bound   more routed tokens than the client can have seen
35. counts_not_tensor   expert_counts as a list
36. fingerprint_missing no fingerprint when the server announced one
37. fingerprint_stale   the fingerprint of the previous round (a replayed update)
38. fingerprint_foreign trained from another base config
39. not_an_update       a dict instead of a ClientUpdate
Plus a failure inside the math (40. overflow: finite values whose products overflow) for methods without norm
clipping, traced to that client and rejected; and property tests throwing random shapes, dtypes and values.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fcmoe.aggregation import METHODS, AggregationHub, ClientUpdate
from hf_fcmoe.aggregation.validation import check_client_id, rejection_key, update_fingerprint
from tests.conftest import make_state, tiny_mixtral_layout

ROUND = 3
BASE = {"model_type": "mixtral", "hidden_size": 32}
LORA = {"r": 4, "target_parameters": ["mlp.experts.gate_up_proj"]}
GOOD = ("good_a", "good_b", "good_c")
TOKEN_BOUND = 10_000
CAP = 500


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout()


def good_update(layout, glob, cid, seed, num_examples=40):
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in glob.items()}
    counts = torch.randint(1, 9, (layout.num_layers, layout.num_experts), generator=gen)
    return ClientUpdate(cid, state, num_examples, counts, fingerprint=update_fingerprint(BASE, LORA, ROUND))


def make_hub(layout, method, enrolled, **options):
    if method in ("fedadam", "fedyogi"):
        options.setdefault("server_lr", 1e-2)
    hub = AggregationHub(layout, method=method, max_num_examples=CAP, **options)
    for cid in enrolled:
        hub.enroll(cid, 1000 if cid == "over_cap" else 60, max_routed_tokens=TOKEN_BOUND)
    hub.announce(BASE, LORA)
    return hub


def bad_updates(layout, glob):
    """{kind: (update, expected reason fragment)}; the update's id names the kind unless the kind is the id."""
    key = next(iter(glob))
    a_key = layout.by_kind("expert")[0].a_key
    shape = (layout.num_layers, layout.num_experts)

    def variant(cid, state=None, drop=(), **changes):
        base = good_update(layout, glob, cid, seed=zlib.crc32(repr(cid).encode()) % 1000)
        new_state = dict(base.state)
        new_state.update(state or {})
        for k in drop:
            new_state.pop(k)
        fields = {
            "client_id": cid,
            "state": new_state,
            "num_examples": base.num_examples,
            "expert_counts": base.expert_counts,
            "fingerprint": base.fingerprint,
            **changes,
        }
        return ClientUpdate(**fields)

    not_mapping = variant("state_not_mapping")
    not_mapping.state = [1, 2]
    one_inf = glob[key].clone()
    one_inf.view(-1)[3] = float("-inf")
    kinds = {
        "id_not_string": (variant(7), "must be a string"),
        "id_path_separator": (variant("../evil/x"), "path separators"),
        "id_traversal": (variant("a..b"), "'..'"),
        "id_control_char": (variant("bad\nid"), "control characters"),
        "id_empty": (variant(""), "1-96 characters"),
        "id_too_long": (variant("a" * 200), "1-96 characters"),
        "id_git_lock": (variant("branch.lock"), ".lock"),
        "not_enrolled": (variant("stranger"), "never enrolled"),
        "examples_zero": (variant("examples_zero", num_examples=0), "positive integer"),
        "examples_negative": (variant("examples_negative", num_examples=-3), "positive integer"),
        "examples_float": (variant("examples_float", num_examples=5.0), "positive integer"),
        "examples_bool": (variant("examples_bool", num_examples=True), "positive integer"),
        "examples_over_declared": (variant("examples_over_declared", num_examples=61), "declared size 60"),
        "over_cap": (variant("over_cap", num_examples=CAP + 1), "cap of 500"),
        "state_not_mapping": (not_mapping, "mapping"),
        "missing_key": (variant("missing_key", drop=[key]), "missing keys"),
        "extra_key": (variant("extra_key", state={"evil.weight": torch.zeros(2)}), "unexpected keys"),
        "not_a_tensor": (variant("not_a_tensor", state={key: np.zeros(glob[key].shape, np.float32)}), "torch.Tensor"),
        "wrong_shape": (variant("wrong_shape", state={key: torch.zeros(3, 3)}), "shape"),
        "wrong_rank": (
            variant("wrong_rank", state={a_key: torch.zeros(glob[a_key].shape[0] * 2, glob[a_key].shape[1])}),
            "rank 8 differs from layout rank 4",
        ),
        "dtype_float64": (variant("dtype_float64", state={key: glob[key].double()}), "dtype torch.float64"),
        "dtype_float16": (variant("dtype_float16", state={key: glob[key].half()}), "dtype torch.float16"),
        "dtype_integer": (variant("dtype_integer", state={key: glob[key].long()}), "dtype torch.int64"),
        "nan": (variant("nan", state={key: torch.full_like(glob[key], float("nan"))}), "NaN or Inf"),
        "pos_inf": (variant("pos_inf", state={key: torch.full_like(glob[key], float("inf"))}), "NaN or Inf"),
        "one_neg_inf": (variant("one_neg_inf", state={key: one_inf}), "NaN or Inf"),
        "sparse": (variant("sparse", state={key: glob[key].to_sparse()}), "dense"),
        "meta_device": (variant("meta_device", state={key: torch.empty(glob[key].shape, device="meta")}), "dense"),
        "counts_shape": (variant("counts_shape", expert_counts=torch.ones(1, 1, dtype=torch.long)), "expert_counts"),
        "counts_float": (variant("counts_float", expert_counts=torch.ones(shape)), "integer token counts"),
        "counts_bool": (variant("counts_bool", expert_counts=torch.ones(shape, dtype=torch.bool)), "integer"),
        "counts_negative": (
            variant("counts_negative", expert_counts=-torch.ones(shape, dtype=torch.long)),
            "negative counts",
        ),
        "counts_over_bound": (
            variant("counts_over_bound", expert_counts=torch.full(shape, TOKEN_BOUND, dtype=torch.long)),
            "more than the bound of 10000",
        ),
        "counts_not_tensor": (variant("counts_not_tensor", expert_counts=[[1] * shape[1]] * shape[0]), "dense tensor"),
        "fingerprint_missing": (variant("fingerprint_missing", fingerprint=None), "sent no fingerprint"),
        "fingerprint_stale": (
            variant("fingerprint_stale", fingerprint=update_fingerprint(BASE, LORA, ROUND - 1)),
            "fingerprint does not match",
        ),
        "fingerprint_foreign": (
            variant("fingerprint_foreign", fingerprint=update_fingerprint({**BASE, "hidden_size": 64}, LORA, ROUND)),
            "fingerprint does not match",
        ),
    }
    return kinds


@pytest.mark.parametrize("method", METHODS)
def test_every_bad_kind_is_rejected_and_the_round_equals_the_good_clients_alone(layout, method):
    glob = make_state(layout, 0)
    good = [good_update(layout, glob, cid, seed=i + 1) for i, cid in enumerate(GOOD)]
    kinds = bad_updates(layout, glob)
    twin = good_update(layout, glob, "twin", seed=50)
    impostor = good_update(layout, glob, "twin", seed=51)
    not_an_update = {"client_id": "dict_client", "state": {}}
    enrolled = [*GOOD, "twin", *(u.client_id for u, _ in kinds.values() if isinstance(u.client_id, str))]
    enrolled = [cid for cid in enrolled if cid != "stranger" and check_id_ok(cid)]
    updates = [good[0], *(u for u, _ in kinds.values()), twin, good[1], impostor, not_an_update, good[2]]
    result = make_hub(layout, method, enrolled).aggregate(glob, updates, round=ROUND)
    rejected = result.diagnostics["rejected"]
    assert len(kinds) + 2 == 39  # the table's kinds + duplicated id + not a ClientUpdate
    for kind, (update, fragment) in kinds.items():
        reason = rejected[rejection_key(update.client_id)]
        assert fragment in reason, (kind, reason)
        assert f"client {repr(update.client_id)[:20]}" in reason, (kind, reason)
    assert "duplicated client id" in rejected["twin"]
    assert "not a ClientUpdate" in rejected[rejection_key(None)]
    assert result.diagnostics["num_accepted"] == len(GOOD) and not result.failed
    clean = make_hub(layout, method, enrolled).aggregate(glob, good, round=ROUND)
    assert result.global_state.keys() == clean.global_state.keys()
    for key in clean.global_state:
        assert torch.equal(result.global_state[key], clean.global_state[key]), key
    assert result.personalized.keys() == clean.personalized.keys()
    for cid in clean.personalized:
        for key, tensor in clean.personalized[cid].items():
            assert torch.equal(result.personalized[cid][key], tensor), (cid, key)


def check_id_ok(cid) -> bool:
    try:
        check_client_id(cid)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("method", "options"), [("ties", {}), ("dare_ties", {})])
def test_a_failure_inside_the_math_rejects_that_client_only(layout, method, options):
    """Finite values whose products overflow float32 (the issue's raw torch.linalg error out of `ties`)."""
    glob = make_state(layout, 0)
    good = [good_update(layout, glob, cid, seed=i + 1) for i, cid in enumerate(GOOD)]
    overflow = good_update(layout, glob, "overflow", seed=9)
    overflow.state = {k: torch.full_like(v, 1e30) for k, v in overflow.state.items()}
    result = AggregationHub(layout, method, **options).aggregate(glob, [*good, overflow])
    reason = result.diagnostics["rejected"]["overflow"]
    assert "client 'overflow'" in reason and "aggregating its update failed" in reason, reason
    clean = AggregationHub(layout, method, **options).aggregate(glob, good)
    for key in clean.global_state:
        assert torch.equal(result.global_state[key], clean.global_state[key]), key


@pytest.mark.parametrize("method", ["fcmoe", "fedmoe", "fedgh"])
def test_any_exception_in_a_method_becomes_that_clients_rejection(layout, method, monkeypatch):
    """Whatever raises inside the block math for one client's contribution rejects that client, not the round."""
    from hf_fcmoe.aggregation import blocks

    real_run = blocks.BlockRound.run

    def run(self):
        if any(u.client_id == "poison" for u in self.rd.updates):
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return real_run(self)

    monkeypatch.setattr(blocks.BlockRound, "run", run)
    glob = make_state(layout, 0)
    good = [good_update(layout, glob, cid, seed=i + 1) for i, cid in enumerate(GOOD)]
    poison = good_update(layout, glob, "poison", seed=9)
    result = AggregationHub(layout, method).aggregate(glob, [*good, poison])
    assert "LinAlgError" in result.diagnostics["rejected"]["poison"] and not result.failed
    clean = AggregationHub(layout, method).aggregate(glob, good)
    for key in clean.global_state:
        assert torch.equal(result.global_state[key], clean.global_state[key]), key


def test_enroll_and_check_client_id_refuse_unsafe_names(layout):
    hub = AggregationHub(layout, "fedavg")
    for bad in ("a/b", "..", "x\x00y", "", "con\\x"):
        with pytest.raises(ValueError, match="unsafe client id"):
            hub.enroll(bad, 10)
    with pytest.raises(ValueError, match="declared size"):
        hub.enroll("ok", 0)
    assert check_client_id("client_000") == "client_000"


def test_fingerprint_ignores_paths_and_versions_but_not_architecture():
    base = {"model_type": "mixtral", "hidden_size": 32, "_name_or_path": "/a", "transformers_version": "5.0"}
    lora = {"r": 4, "target_modules": {"q_proj", "k_proj"}, "base_model_name_or_path": "/a"}
    moved = {**base, "_name_or_path": "/b", "transformers_version": "5.1"}
    assert update_fingerprint(base, lora, 1) == update_fingerprint(moved, {**lora, "base_model_name_or_path": "/b"}, 1)
    assert update_fingerprint(base, lora, 1) != update_fingerprint(base, lora, 2)
    assert update_fingerprint(base, lora, 1) != update_fingerprint({**base, "hidden_size": 64}, lora, 1)
    assert update_fingerprint(base, lora, 1) != update_fingerprint(base, {**lora, "r": 8}, 1)


def test_announced_fingerprint_needs_a_round(layout):
    hub = AggregationHub(layout, "fedavg")
    hub.announce(BASE, LORA)
    glob = make_state(layout, 0)
    with pytest.raises(ValueError, match="round="):
        hub.aggregate(glob, [good_update(layout, glob, "a", 1)])


# ----------------------------------------------------------------- property tests
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool, torch.complex64]
VALUES = st.sampled_from([0.0, 1e-3, 0.1, 1.0, 1e4, 1e30, 3e38, float("nan"), float("inf"), float("-inf")])


@st.composite
def random_update(draw, layout, glob):
    key = draw(st.sampled_from(sorted(glob)))
    state = {k: v + 0.05 for k, v in glob.items()}
    mutation = draw(st.sampled_from(["shape", "dtype", "value", "drop", "scale", "none"]))
    if mutation == "shape":
        dims = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        state[key] = torch.zeros(dims)
    elif mutation == "dtype":
        state[key] = glob[key].to(draw(st.sampled_from(DTYPES)))
    elif mutation == "value":
        tensor = state[key].clone()
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(VALUES)
        state[key] = tensor
    elif mutation == "drop":
        state.pop(key)
    elif mutation == "scale":
        factor = draw(st.sampled_from([-1e6, -1.0, 0.0, 1e3, 1e6, 1e20]))
        state = {k: g + factor * (v - g) for (k, v), g in zip(state.items(), glob.values())}
    num_examples = draw(st.one_of(st.integers(-5, 10**9), st.floats(allow_nan=True), st.just(True)))
    counts_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool]))
    counts_shape = draw(st.sampled_from([(layout.num_layers, layout.num_experts), (1, 1), (layout.num_experts,)]))
    counts = torch.randint(-1, 5, counts_shape).to(counts_dtype)
    cid = draw(st.sampled_from(["fuzz", "fu/zz", "..", "fuzz\t"]))
    return ClientUpdate(cid, state, num_examples, draw(st.sampled_from([counts, None])))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_random_updates_give_a_clear_rejection_or_a_finite_round(layout, method, data):
    glob = make_state(layout, 0)
    good = [good_update(layout, glob, cid, seed=i + 1) for i, cid in enumerate(GOOD[:2])]
    for update in good:
        update.fingerprint = None
    fuzz = data.draw(random_update(layout, glob))
    options = {"server_lr": 1e-2} if method in ("fedadam", "fedyogi") else {}
    result = AggregationHub(layout, method, **options).aggregate(glob, [*good, fuzz])  # nothing but a result
    assert not result.failed
    rejected = result.diagnostics["rejected"]
    key = rejection_key(fuzz.client_id)
    if key in rejected:
        assert rejected[key].startswith(f"client {fuzz.client_id!r}:") and len(rejected[key]) < 400
    else:
        assert result.diagnostics["num_accepted"] == 3
    for tensor in result.global_state.values():
        assert bool(torch.isfinite(tensor).all())
    assert all(math.isfinite(float(w)) for weights in result.weights.values() for w in weights.values())
