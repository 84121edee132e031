"""Ordering and selecting by per-pair scores on a real local Ray cluster, on synthetic data of known structure:
two task families of different difficulty (easy_to_hard / hard_to_easy), learnable, label-flipped and
already-learnt pairs (learnability_top), and the rows' own scores (score_column). Runs are `plan_only`: the
split is what is tested; the stages after it are the pipeline's usual ones (test_pipeline.py)."""

import json
import random

import pyarrow.parquet as pq
import pytest

from sdpo import assets
from sdpo.config import parse_job
from sdpo.pipeline import run

from .conftest import STORIES

pytestmark = pytest.mark.timeout(600)

NAMES = "Lily Tom Ben Mia Sam Anna Max Sue".split()
ANIMALS = "cat dog bird fish bunny frog".split()
PLACES = "park garden house forest".split()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _story(rng):
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    return f"Once upon a time, there was a little {animal} named {name}. {name} liked to play in the {place}."


def difficulty_families(tmp_path, n=40, seed=0):
    """`fluent`: a fluent story against the same words shuffled (the model prefers the story by a wide margin:
    easy); `subtle`: the same story with two names swapped (both fluent: hard)."""
    rng = random.Random(seed)
    fluent, subtle = [], []
    for _ in range(n):
        story = _story(rng)
        words = story.split()
        rng.shuffle(words)
        fluent.append({"prompt": "Tell me a story.", "chosen": story, "rejected": " ".join(words)})
        a, b = rng.sample(NAMES, 2)
        story = f"Once upon a time, there was a little {rng.choice(ANIMALS)} named {a}. {a} liked to play with {b}."
        subtle.append({"prompt": "Tell me a story.", "chosen": story, "rejected": story.replace(a, "#").replace(b, a)
                       .replace("#", b)})
    return _write(tmp_path / "fluent.jsonl", fluent), _write(tmp_path / "subtle.jsonl", subtle)


def make_job(tmp_path, model, sources, partitioning, **over):
    raw = {
        "name": "scores", "model": {"path": str(model)},
        "data": {"sources": [{"name": n, "path": str(p)} for n, p in sources.items()],
                 "max_length": 64, "max_prompt_length": 24, "eval": {"fraction": 0.0}},
        "partitioning": partitioning,
        "training": {"learning_rate": 1e-3, "batch_size": 16, "logging_steps": 100},
        "scaling": {"num_workers": 1}, "output_dir": str(tmp_path / "out"),
    } | over
    return parse_job(raw)


def partitions(out):
    return pq.read_table(out / "data" / "partitions").to_pandas()


def plan(job, lines=None):
    log = lines if lines is not None else []
    return run(job, overwrite=True, plan_only=True, log=log.append), log


def test_workers_import_this_checkout(ray_session):
    import sdpo

    @ray_session.remote
    def where():
        import sdpo as s

        return s.__file__

    assert ray_session.get(where.remote()) == sdpo.__file__


def test_easy_to_hard_puts_the_easy_family_first(ray_session, tmp_path, shared):
    fluent, subtle = difficulty_families(tmp_path)
    sources = {"fluent": fluent, "subtle": subtle}
    job = make_job(tmp_path, STORIES, sources, {"strategy": "easy_to_hard", "num_parts": 2})
    summary, log = plan(job)
    rows = partitions(tmp_path / "out")
    first = rows[rows.split == "part1"]
    assert summary["data"]["partitions"] == {"part1": 40, "part2": 40}
    assert (first.source == "fluent").mean() >= 0.9
    assert first.difficulty.min() >= rows[rows.split == "part2"].difficulty.max()  # ordered by gamma, high first
    assert any("base pass on the 80 training pairs: cache miss" in line for line in log)
    hist = summary["scores"]["histograms"]["score"]
    assert set(hist) == {"part1", "part2"} and sum(hist["part1"]["counts"]) == 40


def learnability_mix(tmp_path, counts=(84, 24, 36), seed=0):
    """Quickstart `easy` pairs (polite beats rude): learnable as given; label-flipped (rude beats polite:
    unlearnable against the rest); already learnt (the rejected reply is the chosen one plus ten junk words, so
    the model ranks the pair right by a wide margin). Each row says which it is in `kind`."""
    rng = random.Random(seed)
    rows = []
    for kind, n in zip(("learnable", "flipped", "learnt"), counts, strict=True):
        for _ in range(n):
            pair = assets._easy_pair(rng) | {"kind": kind}
            if kind == "flipped":
                pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            elif kind == "learnt":
                pair["rejected"] = [{"role": "assistant", "content": pair["chosen"][0]["content"] + " you" * 10}]
            rows.append(pair)
    rng.shuffle(rows)
    return _write(tmp_path / "mix.jsonl", rows)


def test_learnability_top_keeps_the_learnable_pairs_and_reruns_from_cache(ray_session, tmp_path):
    qs = assets.build_quickstart_assets(tmp_path / "qs")
    mix = learnability_mix(tmp_path)
    # the probe trains on three quarters of the pairs (picked by content) and scores them all
    selection = {"strategy": "learnability_top", "top_fraction": 0.5,
                 "probe": {"learning_rate": 3e-3, "fraction": 0.75}}
    job = make_job(tmp_path, qs.model_dir, {"mix": mix}, {"strategy": "random", "num_parts": 1,
                                                            "selection": selection})
    summary, log = plan(job)
    rows = partitions(tmp_path / "out")
    kinds = [json.loads(line)["kind"] for line in mix.read_text().splitlines()]
    rows["kind"] = [kinds[i - 1] for i in rows.line]
    kept = rows[rows.split == "part1"]
    assert {"gamma", "gamma_per_token", "difficulty", "learnability"} <= set(rows.columns)
    assert len(kept) == 72 and (rows.split == "_dropped").sum() == 72
    assert (kept.kind == "learnable").mean() >= 0.9
    assert (kept.kind == "flipped").sum() == 0
    assert (kept.kind == "learnt").mean() <= 0.1
    sel = summary["scores"]["selection"]
    assert sel["kept"] == 72 and sel["dropped"] == summary["dropped_pairs"] == 72
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped_pairs.jsonl").read_text().splitlines()]
    assert len(dropped) == 72 and all(d["reason"].startswith("learnability_top") for d in dropped)
    assert {(d["source"], d["line"]) for d in dropped} == set(zip(rows.source[rows.split == "_dropped"],
                                                                   rows.line[rows.split == "_dropped"], strict=True))
    assert max(d["learnability"] for d in dropped) <= kept.learnability.min()
    trained = [line for line in log if line.startswith("probe stage: training on")]
    assert len(trained) == 1 and 90 <= int(trained[0].split()[4]) <= 126  # ~3/4 of the 144 pairs

    # the rerun: the base pass, the probe and its pass all come from the cache; the same pairs are kept
    again, log = plan(job)
    assert any("probe stage: cache hit" in line for line in log)
    assert sum("cache hit" in line and "pass on the 144 training pairs" in line for line in log) == 2
    assert not any("probe stage: training" in line for line in log)
    assert set(partitions(tmp_path / "out").query("split == '_dropped'").line) == set(
        rows.line[rows.split == "_dropped"])


def test_score_column_orders_by_the_rows_own_scores(ray_session, tmp_path):
    qs = assets.build_quickstart_assets(tmp_path / "qs")
    rng = random.Random(1)
    rows = [assets._easy_pair(rng) | {"quality": float(i % 7)} for i in range(42)] + [assets._easy_pair(rng)]
    path = _write(tmp_path / "scored.jsonl", rows)
    job = make_job(tmp_path, qs.model_dir, {"s": path}, {"strategy": "score_column", "score_field": "quality",
                                                         "score_order": "ascending", "num_parts": 2})
    summary, log = plan(job)
    out = partitions(tmp_path / "out")
    assert summary["rejected_rows"] == 1  # the last row has no score: quarantined, with the reason
    assert "score field 'quality' is missing" in (tmp_path / "out" / "rejected_rows.jsonl").read_text()
    quality = {i + 1: r["quality"] for i, r in enumerate(rows[:-1])}
    first, second = (out[out.split == p].line.map(quality) for p in ("part1", "part2"))
    assert len(first) == len(second) == 21 and first.max() <= second.min()
    assert not any("pass on the" in line for line in log)  # no model pass for the rows' own scores
