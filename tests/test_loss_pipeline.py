"""The loss family through the real pipeline: Ray Data ingest and passes, Ray Train stages, stories260K.

One 3-stage run covers the loss kinds' code paths — a listwise loss with explicit rewards on K-response
rows and scored pairs (group scoring pass, group collation), a reference-free loss (no reference
pass), and a mean-aggregated loss with an option (ipo) — with one loss per stage through `stages[].loss`.
A reward-aware loss on pairs without rewards is refused before any training.
"""

import json
import math

import pyarrow.parquet as pq
import pytest

from sdpo.config import ConfigError, parse_job
from sdpo.pipeline import run

from .conftest import ORCA, STORIES, ULTRAFEEDBACK

pytestmark = pytest.mark.timeout(600)


def k_response_file(path, n=40):
    """K = 3 rows from real UltraFeedback text: chosen, rejected and the next row's rejected answer."""
    records = [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()[200:200 + n + 1]]
    with open(path, "w") as f:
        for r, nxt in zip(records, records[1:], strict=False):
            low = min(r["score_chosen"], r["score_rejected"]) - 1.0
            f.write(json.dumps({"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"], nxt["rejected"]],
                                "rewards": [r["score_rejected"], r["score_chosen"], low]}) + "\n")
    return path


def job(tmp_path, **over):
    raw = {
        "name": "losses",
        "model": {"path": str(STORIES)},
        "data": {
            "sources": [
                {"name": "scored", "path": str(ULTRAFEEDBACK), "max_rows": 45},
                {"name": "groups", "path": str(k_response_file(tmp_path / "groups.jsonl"))},
            ],
            "max_length": 96, "max_prompt_length": 48, "eval": {"fraction": 0.1, "max_pairs_per_source": 4},
        },
        "partitioning": {"strategy": "stratified", "num_parts": 3},
        "training": {"learning_rate": 1e-3, "batch_size": 4, "logging_steps": 100},
        "output_dir": str(tmp_path / "out"),
    }
    raw.update(over)
    return parse_job(raw)


@pytest.fixture(scope="module")
def mixed(ray_session, tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("mixed")
    stages = [{"loss": {"type": "infonca", "alpha": 2.0}}, {"loss": {"type": "simpo", "beta": 2.0}},
              {"loss": {"type": "ipo"}}]
    lines = []
    summary = run(job(tmp, stages=stages), log=lines.append)
    return tmp / "out", summary, lines


def test_each_stage_ran_its_own_loss_with_finite_metrics(mixed):
    _, summary, _ = mixed
    s1, s2, s3 = summary["stages"]
    assert [s["loss"]["type"] for s in (s1, s2, s3)] == ["infonca", "simpo", "ipo"]
    assert s1["loss"]["alpha"] == 2.0 and s2["loss"] == {"type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}
    for s in (s1, s2, s3):
        m = s["metrics"]
        for key in ("first_step_loss", "final/loss", "train/rewards/accuracies", "eval/loss", "eval/ranking_accuracy"):
            assert math.isfinite(m[key]), (s["index"], key)
        assert m["pairs_trained"] == s["num_pairs"]
    # policy = reference at step 1: InfoNCA starts at the cross-entropy of softmax(r / 2) against the uniform
    # model distribution — ln K on K = 3 rows and ln 2 on pairs, so between the two — and IPO at 1/(4 beta^2) = 25
    assert math.log(2) - 1e-4 < s1["metrics"]["first_step_loss"] < math.log(3) + 1e-4
    assert s3["metrics"]["first_step_loss"] == pytest.approx(25.0, rel=1e-3)


def test_listwise_stage_scores_every_response_in_its_reference_pass(mixed):
    _, summary, _ = mixed
    s1 = summary["stages"][0]
    entry = s1["cache"]["reference"]
    table = pq.read_table(entry["path"], columns=["responses_ids", "group_logps", "group_tokens", "chosen_logps",
                                                  "chosen_index", "rewards"]).to_pylist()
    groups = [r for r in table if r["responses_ids"]]
    pairs = [r for r in table if not r["responses_ids"]]
    assert groups and pairs  # stratified: both sources in every partition
    for r in groups:
        assert len(r["group_logps"]) == len(r["responses_ids"]) == len(r["rewards"]) == 3
        assert r["group_logps"][r["chosen_index"]] == r["chosen_logps"]
    for r in pairs:
        assert len(r["group_logps"]) == 2 and len(r["rewards"]) == 2  # scored pairs: [chosen, rejected]


def test_reference_free_stage_has_no_reference_pass(mixed):
    _, summary, lines = mixed
    s2 = summary["stages"][1]
    assert s2["reference_mode"] == "none"
    assert "reference" not in s2["cache"] and "base" in s2["cache"]
    assert "gamma_ref/mean" not in s2["metrics"] and math.isfinite(s2["metrics"]["gamma_base/mean"])
    assert not any(line.startswith("stage 2: reference pass") for line in lines)


def test_plan_prints_each_stages_loss(mixed):
    _, _, lines = mixed
    plan = next(line for line in lines if line.lstrip().startswith("stage") and "loss" in line)
    assert "loss" in plan
    text = "\n".join(lines)
    for name in ("infonca", "simpo", "ipo"):
        assert f" {name} " in text


# Three more stages, each a path of its own through the pipeline that the mixed run does not take: a
# pairwise option read from `stages[].loss` (robust's label_smoothing), a loss on the reference's chosen
# log-probs inside the step (dpop, online), and a reward-aware listwise loss on scored pairs with an online
# reference (nca). Every loss of the registry runs the same training step on the real model, Ray-free, in
# test_loss_training.py; a Ray Train stage per loss (12 stages) added only start-up time.
OTHERS = [{"type": "robust", "label_smoothing": 0.2}, {"type": "dpop", "dpop_lambda": 5.0},
          {"type": "nca", "alpha": 0.5}]


@pytest.fixture(scope="module")
def every_other_loss(ray_session, tmp_path_factory, shared):
    """One short stage per loss above. No inference pass at all, to keep the stages cheap: no held-out
    split, no gamma pass, and the reference runs online inside the training step (the mixed run above
    covers the reference pass of pairs, scored pairs and K-response rows)."""
    tmp = tmp_path_factory.mktemp("others")
    over = {"partitioning": {"strategy": "random", "num_parts": len(OTHERS)},
            "stages": [{"loss": loss} for loss in OTHERS], "reference": {"gamma": False, "mode": "online"}}
    j = job(tmp, **over)
    j = parse_job(j.model_dump(mode="json") | {"data": j.data.model_dump(mode="json") | {"eval": {"fraction": 0.0}}})
    return run(j, log=lambda s: None)


def test_every_other_loss_runs_a_stage_with_finite_metrics(every_other_loss):
    """Each stage starts from its reference (init: previous), so its first-step loss is the loss's value at
    rho = 0; the stage's record carries the options the job gave it, not the defaults."""
    from sdpo.losses import get_loss

    stages = every_other_loss["stages"]
    assert [s["loss"]["type"] for s in stages] == [x["type"] for x in OTHERS]
    assert [{k: s["loss"][k] for k in x} for s, x in zip(stages, OTHERS, strict=True)] == OTHERS
    for s in stages:
        m = s["metrics"]
        assert all(math.isfinite(m[k]) for k in ("first_step_loss", "final/loss", "train/rewards/margins")), s["loss"]
        assert m["pairs_trained"] == s["num_pairs"]
        spec = get_loss(s["loss"]["type"])
        if not spec.listwise:
            import torch

            from sdpo.losses import preference_loss

            zero = torch.zeros(1, dtype=torch.float64)
            options = {k: v for k, v in s["loss"].items() if k not in ("type", "beta")}
            expected = float(preference_loss(spec.name, zero, zero, zero, zero, beta=s["loss"]["beta"], **options))
            assert m["first_step_loss"] == pytest.approx(expected, abs=1e-4), s["loss"]


def test_reward_loss_on_pairs_without_rewards_is_refused_before_training(ray_session, tmp_path):
    """orca has no scores: nca on its partition stops after ingest, naming the stage, partition and source."""
    bad = job(tmp_path, data={"sources": [{"name": "orca", "path": str(ORCA), "max_rows": 20},
                                          {"name": "scored", "path": str(ULTRAFEEDBACK), "max_rows": 20}],
                              "max_length": 96, "max_prompt_length": 48},
              partitioning={"strategy": "natural"}, stages=[{"loss": {"type": "nca"}}, {}])
    with pytest.raises(ConfigError) as info:
        run(bad, log=lambda s: None)
    msg = str(info.value)
    assert "stage 1" in msg and "'nca'" in msg and "'orca'" in msg and "score_chosen" in msg
    assert not (tmp_path / "out" / "stages").exists()


def test_unknown_stage_loss_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.loss.*'dpop_lambda'"):
        job_raw = {"model": {"path": "m"}, "data": {"sources": [{"name": "a", "path": "a.jsonl"}]},
                   "stages": [{"loss": {"type": "hinge", "dpop_lambda": 5}}]}
        parse_job(job_raw)
