"""The sDPO pipeline on a real local Ray cluster, a real model and the shared real data."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo.caching import model_digest, read_marker
from sdpo.config import ConfigError, parse_job
from sdpo.pipeline import run
from sdpo.report import format_value, stage_table
from sdpo.scoring import score_pairs
from sdpo.training import fingerprint

from .conftest import ORCA, STORIES, ULTRAFEEDBACK

pytestmark = pytest.mark.timeout(600)


def job(tmp_path, **over):
    raw = {
        "name": "it",
        "model": {"path": str(STORIES)},
        "data": {
            "sources": [
                {"name": "orca", "path": str(ORCA), "max_rows": 43},
                {"name": "ultrafeedback", "path": str(ULTRAFEEDBACK), "max_rows": 41},
            ],
            "max_length": 96, "max_prompt_length": 48, "eval": {"fraction": 0.1},
        },
        "training": {"learning_rate": 1e-3, "batch_size": 4, "logging_steps": 100},
        "scaling": {"num_workers": 2},
        "output_dir": str(tmp_path / "out"),
    }
    raw.update(over)
    return parse_job(raw)


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def two_stage(ray_session, tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("two_stage")
    # stage 2 runs two epochs through a per-stage override (and reshuffles between them)
    summary = run(job(tmp, stages=[{}, {"epochs": 2}]), log=lambda s: None)
    return tmp / "out", summary


def test_stage_chain(two_stage):
    """Stage 1's reference and init are the base model; stage 2's are stage 1's model."""
    out, summary = two_stage
    s1, s2 = summary["stages"]
    assert (s1["partition"], s2["partition"]) == ("orca", "ultrafeedback")
    assert s1["reference"] == s1["init"] == str(STORIES)
    assert s2["reference"] == s2["init"] == s1["model"]
    assert summary["final_model"] == s2["model"] == str((out / "stages" / "2" / "model").resolve())
    # the reference log-probs stage 2 trained against were computed from exactly stage 1's saved weights
    assert s1["reference_digest"] == model_digest(str(STORIES))
    assert s2["reference_digest"] == s1["model_digest"] == model_digest(s1["model"])
    for s in (s1, s2):
        assert read_marker(s["cache"]["reference"]["path"])["model"] == s["reference_digest"]


def test_reference_pass_holds_the_previous_models_log_probs(two_stage):
    """Stage 2's cached rows carry log pi_{M_1}(y|x), recomputed here with stage 1's model."""
    import pyarrow.parquet as pq

    _, summary = two_stage
    s1, s2 = summary["stages"]
    rows = pq.read_table(s2["cache"]["reference"]["path"]).slice(0, 6).to_pydict()
    ids = [rows[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    m1 = AutoModelForCausalLM.from_pretrained(s1["model"])
    expected = score_pairs(m1, *ids, device=torch.device("cpu"))
    assert expected["chosen_logps"] == pytest.approx(rows["chosen_logps"], abs=1e-4)
    assert expected["rejected_logps"] == pytest.approx(rows["rejected_logps"], abs=1e-4)
    assert s2["cache"]["reference"]["num_rows"] == s2["num_pairs"]


def test_parameters_change(two_stage):
    out, summary = two_stage
    base = weights(STORIES)
    m1, m2 = weights(out / "stages" / "1" / "model"), weights(out / "stages" / "2" / "model")
    for name in base:
        assert not torch.equal(base[name], m1[name]), f"stage 1 left {name} unchanged"
        assert not torch.equal(m1[name], m2[name]), f"stage 2 left {name} unchanged"


def test_gamma_diagnostic(two_stage):
    """gamma under the stage's reference vs the base model, recomputed from the cached passes."""
    import pyarrow.parquet as pq

    _, summary = two_stage
    s1, s2 = summary["stages"]
    for s in (s1, s2):
        for role in ("ref", "base"):
            entry = s["cache"]["reference" if role == "ref" else "base"]
            t = pq.read_table(entry["path"], columns=["chosen_logps", "rejected_logps"])
            gamma = t.column("chosen_logps").to_numpy() - t.column("rejected_logps").to_numpy()
            assert len(gamma) == s["num_pairs"]
            assert s["metrics"][f"gamma_{role}/mean"] == pytest.approx(gamma.mean(), rel=1e-9)
            assert s["metrics"][f"gamma_{role}/median"] == pytest.approx(float(np.median(gamma)), rel=1e-9)
            assert sum(s["gamma"][role]["counts"]) == s["num_pairs"]
    # stage 1: the reference is the base model, one pass serves both
    assert s1["cache"]["base"]["key"] == s1["cache"]["reference"]["key"]
    assert s1["metrics"]["gamma_ref/mean"] == s1["metrics"]["gamma_base/mean"]
    # stage 2: M_1 scores D_2 differently from M_0
    assert s2["cache"]["base"]["key"] != s2["cache"]["reference"]["key"]
    assert abs(s2["metrics"]["gamma_ref/mean"] - s2["metrics"]["gamma_base/mean"]) > 1e-3


def test_held_out_evaluation(two_stage):
    _, summary = two_stage
    s1, s2 = summary["stages"]
    names = ("loss", "reward_accuracy", "margin", "loss_vs_ref", "reward_accuracy_vs_ref", "margin_vs_ref",
             "ranking_accuracy", "logps_chosen", "logps_rejected")
    for s in (s1, s2):
        for prefix in ("eval/", "before/eval/", "eval/orca/", "eval/ultrafeedback/"):
            for n in names:
                assert math.isfinite(s["metrics"][prefix + n]), prefix + n
    b = s1["metrics"]
    # before stage 1 the policy is the base model and the reference: zero margins, loss ln 2
    assert b["before/eval/margin"] == 0 and b["before/eval/reward_accuracy"] == 0
    assert b["before/eval/loss"] == pytest.approx(math.log(2))
    # stage 2 starts from M_1 (init: previous) against reference M_1, but is measured against the base too
    m2 = s2["metrics"]
    assert m2["before/eval/margin_vs_ref"] == 0 and m2["before/eval/loss_vs_ref"] == pytest.approx(math.log(2))
    assert m2["before/eval/ranking_accuracy"] == s1["metrics"]["eval/ranking_accuracy"]
    assert m2["before/eval/margin"] == pytest.approx(s1["metrics"]["eval/margin"])
    n = summary["data"]["eval"]
    assert m2["eval/num_pairs"] == n["orca"] + n["ultrafeedback"]


def _content_keys(path) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(path, columns=["content_key"]).column(0).to_pylist())


def test_passes_of_one_model_share_one_pass(two_stage):
    """The base model's held-out pass also scored stage 1's partition and, for gamma, stage 2's; stage 1's
    held-out pass also scored stage 2's reference pass. Every output holds exactly its own rows, scored by
    its own model."""
    import pyarrow.parquet as pq

    out, summary = two_stage
    s1, s2 = summary["stages"]
    assert s1["cache"]["reference"]["status"] == s2["cache"]["reference"]["status"] == "miss"
    assert s1["cache"]["reference"]["scored_with"] == [
        "the held-out pass of the base model", "stage 2's base pass on 'ultrafeedback'"]
    assert s2["cache"]["base"]["scored_with"] == [
        "the held-out pass of the base model", "stage 1's reference pass on 'orca'"]
    assert s2["cache"]["reference"]["scored_with"] == ["the held-out pass of stage 1"]
    data = out / "data" / "partitions"
    assert _content_keys(s1["cache"]["reference"]["path"]) == _content_keys(data / "split=orca")
    for role in ("reference", "base"):
        assert _content_keys(s2["cache"][role]["path"]) == _content_keys(data / "split=ultrafeedback")
    tables = [s1["held_out_tables"]["base"], s1["held_out_tables"]["policy"], s2["held_out_tables"]["policy"]]
    assert s2["held_out_tables"]["reference"] == tables[1] and s2["held_out_tables"]["base"] == tables[0]
    assert len(set(tables)) == 3
    for path in tables:
        assert _content_keys(path) == _content_keys(data / "split=_eval")
        assert read_marker(path)["num_rows"] == len(_content_keys(data / "split=_eval"))
    assert [read_marker(p)["model"] for p in tables] == [model_digest(str(STORIES)), s1["model_digest"],
                                                        s2["model_digest"]]
    rows = pq.read_table(tables[1]).slice(0, 5).to_pydict()
    expected = score_pairs(AutoModelForCausalLM.from_pretrained(s1["model"]),
                           *[rows[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")], device=torch.device("cpu"))
    assert expected["chosen_logps"] == pytest.approx(rows["chosen_logps"], abs=1e-4)
    assert expected["rejected_logps"] == pytest.approx(rows["rejected_logps"], abs=1e-4)


def test_held_out_tables_are_joined_on_the_rows_not_their_order(two_stage, tmp_path):
    import pyarrow.parquet as pq

    from sdpo.passes import eval_metrics

    out, summary = two_stage
    s2 = summary["stages"][1]
    table = pq.read_table(s2["held_out_tables"]["policy"])
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    pq.write_table(table.take(np.random.default_rng(0).permutation(table.num_rows)), shuffled / "part.parquet")
    kw = dict(loss_type="sigmoid", beta=0.1, options={}, sources=["orca", "ultrafeedback"])
    tables = s2["held_out_tables"]
    metrics = eval_metrics(tables, **kw)
    assert metrics == pytest.approx({k: v for k, v in s2["metrics"].items() if k.startswith("eval/")})
    assert eval_metrics(tables | {"policy": str(shuffled)}, **kw) == pytest.approx(metrics)
    short = tmp_path / "short"
    short.mkdir()
    pq.write_table(table.slice(1), short / "part.parquet")
    assert table.num_rows == 8
    with pytest.raises(RuntimeError, match=r"short \(7 rows\) and .* \(8 rows\) do not hold the same rows"):
        eval_metrics(tables | {"policy": str(short)}, **kw)


def test_a_rerun_reuses_the_held_out_passes_of_unchanged_models(two_stage, tmp_path):
    """The same job into another directory, sharing the first run's cache: the held-out passes of every
    model that comes out the same are cache hits, and the metrics are the same."""
    out, summary = two_stage
    log = []
    again = run(job(tmp_path, stages=[{}, {"epochs": 2}], reference={"cache_dir": str(out / "cache")}),
                log=log.append)
    assert any(line.startswith("the held-out pass of the base model: cache hit") for line in log)
    for a, b in zip(summary["stages"], again["stages"], strict=True):
        assert b["model_digest"] == a["model_digest"], "seeded CPU runs train the same weights"
        assert b["held_out_tables"] == a["held_out_tables"]
        assert {k: v for k, v in b["metrics"].items() if "eval/" in k} == \
            {k: v for k, v in a["metrics"].items() if "eval/" in k}
    assert sum("held-out pass" in line and "cache hit" in line for line in log) == 3
    assert not any("held-out pass" in line and "scored in" in line for line in log)


def test_report_is_written_and_matches_the_summary(two_stage):
    out, summary = two_stage
    assert (out / "report.md").is_file()
    for name in ("training", "gamma", "heldout"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = stage_table(json.loads((out / "summary.json").read_text()))
    assert table in (out / "report.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert format_value(summary["stages"][1]["metrics"]["gamma_ref/mean"]) in row
    assert format_value(summary["stages"][1]["metrics"]["eval/reward_accuracy"]) in row


def test_init_previous_starts_at_ln2_and_metrics_are_finite(two_stage):
    _, summary = two_stage
    for s in summary["stages"]:
        m = s["metrics"]
        assert m["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4)
        for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen",
                    "pairs_per_s", "tokens_per_s", "eval/ranking_accuracy", "eval/loss", "gamma_ref/mean"):
            assert math.isfinite(m[key]), key


def test_every_pair_is_trained_exactly_once(two_stage):
    """Odd partition sizes over 2 workers: padding rows weigh 0, no pair is dropped or doubled."""
    out, summary = two_stage
    parts = summary["data"]["partitions"]
    assert parts["orca"] % 2 == 1 or parts["ultrafeedback"] % 2 == 1, "choose max_rows to get an odd size"
    for s, epochs in zip(summary["stages"], (1, 2), strict=True):
        log = [json.loads(x) for x in (out / "stages" / str(s["index"]) / "trainer_log.jsonl").read_text().splitlines()]
        assert s["num_pairs"] == parts[s["partition"]]
        for epoch in range(epochs):
            assert sum(e["pairs"] for e in log if e["epoch"] == epoch) == s["num_pairs"]
        assert s["metrics"]["pairs_trained"] == epochs * s["num_pairs"]
        assert len(log) == summary["plan"][s["index"] - 1]["total_steps"]
    d = summary["data"]
    assert sum(d["rows"].values()) == sum(d["valid"].values()) + d["rejected"]
    assert sum(d["valid"].values()) == sum(parts.values()) + sum(d["eval"].values()) + sum(d["unused"].values())


def test_final_model_loads_with_transformers(two_stage):
    out, summary = two_stage
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    tok = AutoTokenizer.from_pretrained(summary["final_model"])
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final_model"] == summary["final_model"] and len(saved["stages"]) == 2


# --------------------------------------------------------------------------------------------------
# init: base, reference.mode: online, and the cache across stages and runs
# --------------------------------------------------------------------------------------------------
def test_parquet_reads_start_no_actor_pool_per_read(two_stage):
    """Every parquet read of the run (partitions, reference entries, held-out rows) listed its files in
    reused task workers: Ray 2.60's default Parquet reader starts 32 FooterReader actors per read."""
    import ray._private.state

    classes = [a["ActorClassName"] for a in ray._private.state.actors().values()]
    assert "PairScorer" in " ".join(classes)  # the table does hold this module's actors
    assert not [c for c in classes if "FooterReader" in c]


def twin_job(tmp_path, out):
    """Two sources that are the same file: partitions `a` and `b` hold identical pairs (no eval split),
    so stage 2's base-model pass on `b` is the very pass stage 1 ran on `a`."""
    src = {"path": str(ULTRAFEEDBACK), "max_rows": 40}
    return job(tmp_path, data={"sources": [{"name": "a"} | src, {"name": "b"} | src], "max_length": 96,
                               "max_prompt_length": 48, "eval": {"fraction": 0.0}},
               init="base", reference={"mode": "online", "cache_dir": str(tmp_path / "cache")},
               scaling={"num_workers": 1}, output_dir=str(out))


@pytest.fixture(scope="module")
def twin_runs(ray_session, tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("twin")
    first = run(twin_job(tmp, tmp / "first"), log=lambda s: None)
    second = run(twin_job(tmp, tmp / "second"), log=lambda s: None)  # a rerun in another directory
    return first, second


def test_init_base_starts_above_ln2_against_a_better_reference(twin_runs):
    """Stage 2 starts from M_0 against reference M_1, which was trained on the same pairs: the loss
    -log sigmoid(beta * (gamma_0 - gamma_1)) starts above ln 2. Stage 1 starts at ln 2 exactly."""
    first, _ = twin_runs
    s1, s2 = first["stages"]
    assert s2["init"] == str(STORIES) and s2["reference"] == s1["model"]
    assert s1["metrics"]["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert s2["metrics"]["gamma_ref/mean"] > s2["metrics"]["gamma_base/mean"]
    assert s2["metrics"]["first_step_loss"] > math.log(2) + 1e-3


def test_online_reference_is_the_previous_model_and_stays_frozen(twin_runs):
    first, _ = twin_runs
    s1, s2 = first["stages"]
    assert all(s["reference_mode"] == "online" and s["metrics"]["reference_unchanged"] for s in (s1, s2))
    assert s2["metrics"]["reference_fingerprint"] == fingerprint(AutoModelForCausalLM.from_pretrained(s1["model"]))
    assert s1["metrics"]["reference_fingerprint"] == fingerprint(AutoModelForCausalLM.from_pretrained(str(STORIES)))
    assert "eval/loss" not in s2["metrics"], "no eval split, no held-out metrics"


def test_cache_is_reused_within_and_across_runs(twin_runs):
    first, second = twin_runs
    a1, b1 = first["stages"]
    # within a run: same base weights, same pair content (another source) -> the same entry, a hit
    assert a1["cache"]["reference"]["status"] == "miss"
    assert b1["cache"]["base"]["key"] == a1["cache"]["reference"]["key"]
    assert b1["cache"]["base"]["status"] == "hit"
    assert b1["cache"]["reference"]["status"] == "miss"  # M_1 had never scored anything
    # across runs: a rerun hits every pass whose model is unchanged
    a2, b2 = second["stages"]
    assert a2["cache"]["reference"]["status"] == b2["cache"]["base"]["status"] == "hit"
    assert a2["cache"]["reference"]["path"] == a1["cache"]["reference"]["path"]
    # the rerun's stage 1 is bit-identical (seeded, order-preserving data), so M_1's pass hits as well
    assert a2["model_digest"] == a1["model_digest"]
    assert b2["cache"]["reference"]["status"] == "hit"
    assert b2["metrics"]["gamma_ref/mean"] == b1["metrics"]["gamma_ref/mean"]


# --------------------------------------------------------------------------------------------------
# Bad rows: quarantined with a reason, counted; too many stop the run before training
# --------------------------------------------------------------------------------------------------
GOOD = {"prompt": "Tell me a story.", "chosen": "Once upon a time there was a cat.", "rejected": "No."}
BAD = [
    ('{"prompt": "x", "chosen": "a"', "invalid JSON"),
    (json.dumps({"prompt": "x", "chosen": "a"}), "missing field 'rejected'"),
    (json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}), "field 'prompt' is empty"),
    (json.dumps({"prompt": "x", "chosen": 3, "rejected": "b"}), "must be a string or a list of messages"),
    (json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}), "chosen and rejected are identical"),
    (json.dumps({"prompt": "x", "chosen": "a " * 200 + "yes", "rejected": "a " * 200 + "no"}),
     "identical after truncation"),
]


def write_bad_source(path, n_good):
    lines = [json.dumps(GOOD | {"chosen": f"Once upon a time there were {i} cats."}) for i in range(n_good)]
    for i, (row, _) in enumerate(BAD):
        lines.insert(3 * i + 1, row)
    path.write_text("\n".join(lines) + "\n")
    return {i + 1: reason for i, line in enumerate(lines) for row, reason in BAD if line == row}


def bad_job(tmp_path, src, **data):
    return job(tmp_path, data={"sources": [{"name": "mixed", "path": str(src)}], "max_length": 64,
                               "max_prompt_length": 16, "eval": {"fraction": 0.0}} | data)


def test_bad_rows_are_quarantined_with_reason_and_line(ray_session, tmp_path, shared):
    src = tmp_path / "mixed.jsonl"
    expected = write_bad_source(src, n_good=60)
    summary = run(bad_job(tmp_path, src, max_rejected_fraction=0.5), plan_only=True, log=lambda s: None)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected_rows.jsonl").read_text().splitlines()]
    assert summary["rejected_rows"] == len(rejected) == len(BAD)
    got = {r["line"]: r["reason"] for r in rejected}
    assert set(got) == set(expected)
    for line, reason in expected.items():
        assert reason in got[line], (line, got[line])
    assert all(r["source"] == "mixed" and r["file"].endswith("mixed.jsonl") and r["raw"] for r in rejected)
    assert summary["data"]["valid"]["mixed"] == 60
    assert summary["data"]["partitions"]["mixed"] == 60


def test_too_many_bad_rows_stop_before_training(ray_session, tmp_path, shared):
    src = tmp_path / "mixed.jsonl"
    write_bad_source(src, n_good=10)
    with pytest.raises(ConfigError, match=r"6 of 16 rows .* quarantined.*max_rejected_fraction") as err:
        run(bad_job(tmp_path, src, max_rejected_fraction=0.1), log=lambda s: None)
    assert "rejected_rows.jsonl" in str(err.value)
    assert not (tmp_path / "out" / "stages").exists()


def test_parquet_and_json_array_sources(ray_session, tmp_path, shared):
    """Other file formats give the same rows, with their row number as the line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD | {"chosen": f"Once upon a time {i} dogs played."} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps(rows[:5] + [{"prompt": "x"}]))
    spec = {"sources": [{"name": "pq", "path": str(tmp_path / "a.parquet")},
                        {"name": "arr", "path": str(tmp_path / "b.json")}],
            "max_length": 64, "max_prompt_length": 16, "eval": {"fraction": 0.0}, "max_rejected_fraction": 0.2}
    summary = run(job(tmp_path, data=spec), plan_only=True, log=lambda s: None)
    assert summary["data"]["valid"] == {"pq": 12, "arr": 5}
    (bad,) = [json.loads(x) for x in (tmp_path / "out" / "rejected_rows.jsonl").read_text().splitlines()]
    assert (bad["source"], bad["line"]) == ("arr", 6) and "missing field 'chosen'" in bad["reason"]


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[orca\].path: .* matches no file"):
        run(job(tmp_path, data={"sources": [{"name": "orca", "path": str(tmp_path / "nope*.jsonl")}]}),
            log=lambda s: None)


def test_hub_dataset_layouts_through_ingest(ray_session, tmp_path, shared):
    """The paper jobs' two hub layouts, rebuilt from the shared real rows: Intel/orca_dpo_pairs (Parquet,
    {system, question, chosen, rejected} strings) and argilla's UltraFeedback (whole conversations with
    the prompt inside, ratings in their own columns) — every row ingested, the same pairs as TRL rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    orca = [json.loads(x) for x in ORCA.read_text().splitlines()[:30]]
    orca_rows = [{"system": r["prompt"][0]["content"], "question": r["prompt"][-1]["content"],
                  "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}
                 for r in orca if r["prompt"][0]["role"] == "system"]
    pq.write_table(pa.Table.from_pylist(orca_rows), tmp_path / "orca_rlhf.parquet")
    uf = [json.loads(x) for x in ULTRAFEEDBACK.read_text().splitlines()[:30]]
    with open(tmp_path / "uf.jsonl", "w") as f:
        for r in uf:
            user = {"role": "user", "content": r["prompt"]}
            f.write(json.dumps({"prompt": r["prompt"], "chosen-rating": r["score_chosen"],
                                "rejected-rating": r["score_rejected"],
                                "chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                                "rejected": [user, {"role": "assistant", "content": r["rejected"]}]}) + "\n")
    spec = {"sources": [
        {"name": "orca", "path": str(tmp_path / "orca_rlhf.parquet"), "columns": {"prompt": "question", "system": "system"}},
        {"name": "uf", "path": str(tmp_path / "uf.jsonl"), "implicit_prompt": True,
         "columns": {"score_chosen": "chosen-rating", "score_rejected": "rejected-rating"}}],
        "max_length": 96, "max_prompt_length": 48, "eval": {"fraction": 0.0}}
    summary = run(job(tmp_path, data=spec), plan_only=True, log=lambda s: None)
    assert summary["rejected_rows"] == 0
    assert summary["data"]["valid"] == {"orca": len(orca_rows), "uf": 30}
    table = pq.read_table(tmp_path / "out" / "data" / "partitions" / "split=uf").to_pylist()
    assert sorted(r["rewards"] for r in table) == sorted([r["score_chosen"], r["score_rejected"]] for r in uf)



# --------------------------------------------------------------------------------------------------
# Data parallelism: 2 workers × batch b train exactly like 1 worker × batch 2b
# --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(420)
def test_two_workers_train_like_one_with_the_same_global_batch(ray_session, tmp_path, shared, monkeypatch):
    """One stage with `num_workers: 2, batch_size: b` and with `num_workers: 1, batch_size: 2b` (same
    data, lr, seed): the same loss, margin and gradient-norm trajectory up to float rounding.

    The per-step pair sets are made identical by giving every row the same pair. Distinct pairs cannot
    be lined up: Ray Train's `streaming_split(2, equal=True)` hands each worker a contiguous half of
    the stream (step k = rows [bk, bk+b) + [n/2+bk, n/2+bk+b) with 2 workers, rows [2bk, 2bk+2b)
    with 1), whatever the order; periodic data would line up in the stored order (`shuffle: false`),
    but not under the seeded shuffle, which sorts equal pairs together, and the trajectory would then
    depend on the period. With one pair everywhere, what is left is float summation order
    (DDP's all-reduce vs one sum): measured ≤ 2e-6 relative over 7 steps; the tolerance is 1e-4. A gradient
    scaled by the world size moves grad_norm by 2×; n is odd, so the 2-worker run pads one
    zero-weight row, and a padding row counted as a pair would move its step's grad_norm by
    1/(2b) = 12.5%. (Adam is invariant to a constant gradient scale, so grad_norm — the pre-clip norm
    after the rescale — is what pins the rescale down; the loss catches it only through clipping.)

    Both runs accumulate 2 micro-batches per step, and n leaves a partial window at the end: the 2-worker
    run's backwards then run under DDP's no_sync except each window's last, and the partial window's
    gradients are averaged by hand (worker._average_gradients) — a missed all-reduce there would let the
    workers' models diverge and move the last step.

    A third run shards the 2 workers' training state (`parallelism: fsdp`, FSDP2), and one of its workers
    dies after step 4: Ray Train restarts the group from the step-3 checkpoint, which each rank wrote
    as its own shard (DCP, merged by Ray Train), and the run still has the same trajectory, a final
    model gathered from the shards (a Hugging Face model), and final weights equal to the DDP run's up
    to float rounding. Both 2-worker runs compute the prompt
    through the KV cache (`prefix_cache`, three model calls before each backward), the 1-worker run under
    the 4D mask: the layouts agree to float rounding too."""
    b, steps, accum = 4, 7, 2
    n = 2 * b * (steps - 1) + 3  # 6 full steps of 2b pairs and a partial window; odd, so 2 workers pad one row
    src = tmp_path / "same.jsonl"
    src.write_text((json.dumps(GOOD | {"chosen": "Once upon a time there were three cats and a big dog."}) + "\n") * n)
    logs = {}
    marker = tmp_path / "fault-fired"
    for name, world, parallelism in (("ddp", 2, "ddp"), ("fsdp", 2, "fsdp"), ("one", 1, "ddp")):
        out = tmp_path / name
        if parallelism == "fsdp":  # read by the driver when the stage starts (pipeline.stage_config)
            monkeypatch.setenv("SDPO_INJECT_FAULT", f"stage=1,step=4,rank=1,once={marker}")
        else:
            monkeypatch.delenv("SDPO_INJECT_FAULT", raising=False)
        spec = {"sources": [{"name": "p", "path": str(src)}], "max_length": 64, "max_prompt_length": 24,
                "eval": {"fraction": 0.0}}
        summary = run(job(tmp_path, data=spec, output_dir=str(out), scaling={"num_workers": world},
                          training={"learning_rate": 1e-4, "batch_size": b * (3 - world) // accum,
                                    "gradient_accumulation_steps": accum, "logging_steps": 100,
                                    "parallelism": parallelism, "prefix_cache": world == 2},
                          reference={"mode": "online", "gamma": False},
                          checkpointing={"every_steps": 3 if parallelism == "fsdp" else None, "max_failures": 1}),
                      log=lambda s: None)
        stage = summary["stages"][0]
        assert stage["num_pairs"] == n
        m = stage["metrics"]
        assert m["peak_rss_mib"] > 0 and len(m["peak_rss_mib_by_rank"]) == world
        # the stream's start-up (first batch: read + seeded sort) is apart from the steady-state waits
        assert m["data_startup_s"] > 0 and m["data_wait_s"] >= 0
        assert m["data_startup_s"] + m["data_wait_s"] <= m["train_seconds"]
        assert m["data_wait_fraction"] == pytest.approx(
            m["data_wait_s"] / (m["train_seconds"] - m["data_startup_s"]), rel=0.05)
        logs[name] = [json.loads(x) for x in (out / "stages" / "1" / "trainer_log.jsonl").read_text().splitlines()]
        if parallelism == "fsdp":
            fsdp_resumed = m["resumed_from_step"]
    # FSDP: the fault fired and the group resumed from step 3; the mid-stage checkpoints hold every rank's
    # shard and no gathered state; the stage's model is whole
    assert marker.exists() and fsdp_resumed == 3
    indexes = sorted((tmp_path / "fsdp").rglob("sharded/.metadata"))
    assert indexes, "no sharded checkpoint"
    for index in indexes:
        assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in index.parent.iterdir()}
        assert torch.load(index.parent.parent / "train_state.pt", weights_only=False)["optimizer"] is None
        assert not (index.parent.parent / "model.safetensors").exists()
    final = {k: weights(tmp_path / k / "stages" / "1" / "model") for k in ("ddp", "fsdp")}
    assert final["fsdp"].keys() == final["ddp"].keys()
    assert max((final["fsdp"][k] - final["ddp"][k]).abs().max().item() for k in final["ddp"]) < 1e-5
    fsdp = logs.pop("fsdp")
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [e[key] for e in fsdp] == pytest.approx([e[key] for e in logs["ddp"]], rel=1e-5, abs=1e-7), key
    two, one = logs["ddp"], logs["one"]
    # Every pair once in each run, in 7 steps (with 2 workers the padding row lands in whichever step met
    # it: the split does not keep the stream's order). All rows being one pair, each step's mean gradient
    # is the same whatever its count.
    for log in (two, one):
        assert len(log) == steps and sum(e["pairs"] for e in log) == n
    assert one[-1]["pairs"] == 3
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen")
    for key in keys:
        print(f"{key:>16}  2 workers: {[round(e[key], 6) for e in two]}")
        print(f"{'':>16}  1 worker:  {[round(e[key], 6) for e in one]}")
    diffs = {k: max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(two, one, strict=True)) for k in keys}
    print("largest difference (absolute below 1, relative above):", diffs)
    assert two[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(diffs.values()) < 1e-4, diffs


# --------------------------------------------------------------------------------------------------
# training.shuffle: false — the sources' order, whatever the files' layout
# --------------------------------------------------------------------------------------------------
def _scrambled_partition(directory, rows, files):
    """Write `rows` (dicts of the partition's columns) into parquet files in `files`' order of row
    indices — a layout unrelated to the rows' positions, as Ray's writer may leave it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for name, idx in files.items():
        pq.write_table(pa.Table.from_pylist([rows[i] for i in idx]), str(directory / name))


def test_shuffle_false_reads_a_split_in_its_sources_order(ray_session, tmp_path):
    """With `shuffle_seed=None` a split is read in its rows' stored positions (source as listed, file by
    name, line), from the partition and from a reference entry alike, however the files lay them out."""
    from sdpo.caching import multiset_digest, position_keys
    from sdpo.ingest import split_dataset
    from sdpo.passes import order_digest

    # 11 rows: source 1's file, then source 0's two files (b before a), lines out of order within each
    positions = [(1, "/d/z.jsonl", 0), (1, "/d/z.jsonl", 1), (0, "/d/b.jsonl", 2), (0, "/d/b.jsonl", 0),
                 (0, "/d/b.jsonl", 1), (0, "/d/a.jsonl", 3), (0, "/d/a.jsonl", 0), (0, "/d/a.jsonl", 1),
                 (0, "/d/a.jsonl", 2), (1, "/d/y.jsonl", 5), (1, "/d/y.jsonl", 4)]
    rows = [{"prompt_ids": [i + 1], "chosen_ids": [i + 2, 3], "rejected_ids": [i + 4], "content_key": 1000 + i,
             "source_index": s, "file": f, "line": ln, "chosen_logps": -float(i), "rejected_logps": -2.0 * i,
             "chosen_tokens": 2, "rejected_tokens": 1} for i, (s, f, ln) in enumerate(positions)]
    expected = sorted(range(len(rows)), key=lambda i: positions[i])
    layout = {"part-0.parquet": [0, 1, 2, 3], "part-1.parquet": [10, 4, 5], "part-2.parquet": [9, 8, 7, 6]}
    data = tmp_path / "data"
    partition = [{k: v for k, v in r.items() if not k.endswith(("_logps", "_tokens"))} for r in rows]
    _scrambled_partition(data / "partitions" / "split=p", partition, layout)
    entry = tmp_path / "entry"
    _scrambled_partition(entry, rows, {"x.parquet": [5, 0, 9, 1], "y.parquet": [2, 3, 4, 6, 7, 8, 10]})

    def read(**kw):
        ds = split_dataset(str(data), "p", num_pairs=len(rows), world_size=1, shuffle_seed=None, **kw)
        return [b for b in ds.iter_rows()]

    plain = read()
    assert [r["prompt_ids"][0] - 1 for r in plain] == expected
    assert set(plain[0]) == {"prompt_ids", "chosen_ids", "rejected_ids", "weight"}  # positions dropped
    scored = read(reference=str(entry))
    assert [r["prompt_ids"][0] - 1 for r in scored] == expected
    assert [r["ref_chosen_logps"] for r in scored] == [-float(i) for i in expected]
    assert read(with_source=True)[0]["source_index"] == 0

    # the entry's cache key names the pairs *and* their positions: a new layout of the same rows keeps
    # it, a pair moved to another line changes it
    digest = order_digest(str(data / "partitions" / "split=p"))
    again = tmp_path / "again"
    _scrambled_partition(again, partition, {"only.parquet": list(range(len(rows)))[::-1]})
    assert order_digest(str(again)) == digest
    moved = [dict(r) for r in partition]
    moved[6]["line"], moved[7]["line"] = moved[7]["line"], moved[6]["line"]
    _scrambled_partition(tmp_path / "moved", moved, layout)
    assert order_digest(str(tmp_path / "moved")) != digest
    cols = {k: [r[k] for r in partition] for k in ("content_key", "source_index", "file", "line")}
    assert digest == multiset_digest(position_keys(cols["content_key"], np.array(cols["source_index"]),
                                                   cols["file"], np.array(cols["line"])))


@pytest.mark.timeout(300)
def test_shuffle_false_trains_the_pairs_in_file_order(ray_session, tmp_path, shared):
    """A stage with `shuffle: false` and a precomputed reference trains its pairs in the order of its
    files and lines: with one pair a step and a learning rate too small to move the model, step k's
    policy log-prob is the k-th pair's reference log-prob. The reference entry keeps the positions
    and is keyed on them (another entry than a shuffled stage's)."""
    import pyarrow.parquet as pq

    from sdpo.passes import order_digest

    src = tmp_path / "src"
    src.mkdir()
    words = ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "lion", "wolf", "fox"]
    lines = [GOOD | {"chosen": f"Once upon a time there was a {w}" + " and a tree" * i} for i, w in enumerate(words)]
    (src / "part-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[5:]))
    (src / "part-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:5]))
    spec = {"sources": [{"name": "p", "path": str(src / "*.jsonl")}], "max_length": 96, "max_prompt_length": 24,
            "eval": {"fraction": 0.0}}
    summary = run(job(tmp_path, data=spec, scaling={"num_workers": 1},
                      training={"learning_rate": 1e-12, "batch_size": 1, "logging_steps": 100, "shuffle": False},
                      reference={"mode": "precompute", "gamma": False}), log=lambda s: None)
    stage = summary["stages"][0]
    entry = stage["cache"]["reference"]["path"]
    table = pq.read_table(entry).to_pandas().sort_values(["file", "line"])
    assert table["line"].tolist() == [1, 2, 3, 4, 5] * 2 and table["file"].str.endswith("part-0.jsonl")[:5].all()
    steps = [json.loads(x) for x in (tmp_path / "out" / "stages" / "1" / "trainer_log.jsonl").read_text().splitlines()]
    assert len(steps) == len(words)
    np.testing.assert_allclose([s["logps/chosen"] for s in steps], table["chosen_logps"].tolist(), rtol=1e-5)
    assert len(set(np.round(table["chosen_logps"], 3))) == len(words)  # distinct: the order is pinned down
    # the stage's identity (resume, the stage store) is its pairs *in their order*: the same lines in
    # another order are another stage, unlike under the seeded shuffle
    inputs = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]["1"]["inputs"]
    assert inputs["partition"] == "ordered:" + order_digest(str(tmp_path / "out" / "data" / "partitions" / "split=p"))
