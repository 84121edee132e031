"""Job config loading: every mistake is a ConfigError that names the key and says what is wrong."""

import copy

import pytest
import yaml

from sdpo.config import ConfigError, JobConfig, SplitStrategy, apply_overrides, dump_job, load_job, parse_job

MINIMAL = {
    "model": {"path": "m"},
    "data": {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}]},
}


def job_dict(**sections):
    """MINIMAL with top-level keys replaced/added."""
    raw = copy.deepcopy(MINIMAL)
    raw.update(sections)
    return raw


def write(tmp_path, raw, name="job.yaml"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def load_error(tmp_path, raw, overrides=None) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides)
    text = str(info.value)
    assert str(path) in text  # every message says which file it is about
    return text


# --------------------------------------------------------------------------------------------------
# Loading and error messages
# --------------------------------------------------------------------------------------------------
def test_minimal_job_loads_with_defaults(tmp_path):
    job = load_job(write(tmp_path, MINIMAL))
    assert isinstance(job, JobConfig)
    assert job.model.path == "m" and job.model.tokenizer_path == "m"
    assert [s.name for s in job.data.sources] == ["a", "b"]
    assert job.partitioning.strategy is SplitStrategy.natural
    assert job.init == "previous"


def test_missing_job_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "job.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_config_error(tmp_path):
    assert "not valid YAML" in load_error(tmp_path, "model: {path: m\n")


def test_yaml_that_is_not_a_mapping(tmp_path):
    assert "YAML mapping" in load_error(tmp_path, "- a\n- b\n")


def test_unknown_loss_option_is_named_with_the_options_the_loss_takes(tmp_path):
    """`loss` holds the loss's own options, so a typo there is an unknown option of that loss."""
    text = load_error(tmp_path, job_dict(loss={"betta": 0.1}))
    assert "loss:" in text and "'betta'" in text and "label_smoothing" in text


@pytest.mark.parametrize("raw, key", [
    (job_dict(modle={"path": "m"}), "modle"),
    (job_dict(training={"lr": 1e-6}), "training.lr"),
    (job_dict(data={"sources": [{"name": "a", "path": "a.jsonl", "maxrows": 3}]}), "data.sources.0.maxrows"),
])
def test_unknown_key_is_named_with_its_dotted_path(tmp_path, raw, key):
    text = load_error(tmp_path, raw)
    assert f"{key}: unknown key" in text


def test_bad_enum_value_names_key_and_allowed_values(tmp_path):
    text = load_error(tmp_path, job_dict(training={"lr_scheduler": "cosin"}))
    assert "training.lr_scheduler" in text
    assert "'cosin'" in text
    for allowed in ("linear", "cosine", "constant"):
        assert allowed in text


def test_bad_strategy_names_key(tmp_path):
    text = load_error(tmp_path, job_dict(partitioning={"strategy": "roundrobin"}))
    assert "partitioning.strategy" in text and "natural" in text and "stratified" in text


@pytest.mark.parametrize("section, key, value", [
    ("loss", "beta", 0),
    ("loss", "beta", -0.1),
    ("training", "learning_rate", 0),
    ("training", "epochs", 0),
    ("training", "batch_size", -1),
    ("scaling", "num_workers", 0),
])
def test_non_positive_values_are_refused(tmp_path, section, key, value):
    text = load_error(tmp_path, job_dict(**{section: {key: value}}))
    assert f"{section}.{key}" in text
    assert "greater than 0" in text
    assert f"(got {value!r})" in text


@pytest.mark.parametrize("key", ["loss.beta", "training.learning_rate", "stages.0.beta"])
def test_infinite_values_are_refused_at_load(tmp_path, key):
    """beta = .inf passed `gt=0` and failed only in the loss, after the scoring passes."""
    raw = job_dict(stages=[{}])
    text = load_error(tmp_path, raw, [f"{key}=.inf"])
    assert key in text and "finite number" in text


def test_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-2 as a string; a job file and --set read it as the number people mean."""
    path = write(tmp_path, "model: {path: m}\ndata: {sources: [{name: a, path: a.jsonl}]}\n"
                           "training: {learning_rate: 5e-7}\nloss: {type: robust, label_smoothing: 1e-2}\n")
    job = load_job(path)
    assert job.training.learning_rate == 5e-7 and job.loss.model_extra["label_smoothing"] == 0.01
    assert load_job(path, ["loss.label_smoothing=2e-2"]).loss.model_extra["label_smoothing"] == 0.02
    assert load_job(path, ["name=1e3x"]).name == "1e3x"


def test_stage_overrides_must_match_the_partitions_at_load(tmp_path):
    """Checked before any data is read (it was checked only after the ingest, on the cluster)."""
    raw = job_dict(data={"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}]})
    text = load_error(tmp_path, raw, ["stages=[{}, {}, {}]"])
    assert "stages: 3 override entries for 2 partitions" in text and "Value error" not in text
    assert len(load_job(write(tmp_path, raw), ["stages=[{}, {beta: 0.2}]"]).stages) == 2


@pytest.mark.parametrize("max_length, max_prompt_length", [(256, 256), (256, 300)])
def test_prompt_must_be_shorter_than_max_length(tmp_path, max_length, max_prompt_length):
    raw = copy.deepcopy(MINIMAL)
    raw["data"].update(max_length=max_length, max_prompt_length=max_prompt_length)
    text = load_error(tmp_path, raw)
    assert f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})" in text


def test_duplicate_source_names(tmp_path):
    raw = copy.deepcopy(MINIMAL)
    raw["data"]["sources"].append({"name": "a", "path": "other.jsonl"})
    text = load_error(tmp_path, raw)
    assert "data.sources" in text and "unique" in text and "['a']" in text


@pytest.mark.parametrize("order", [["a", "c"], ["a", "a"]])
def test_natural_order_must_name_distinct_known_sources(tmp_path, order):
    text = load_error(tmp_path, job_dict(partitioning={"strategy": "natural", "order": order}))
    assert "partitioning.order" in text
    assert "['a', 'b']" in text  # the names it may use


def test_missing_model(tmp_path):
    raw = copy.deepcopy(MINIMAL)
    del raw["model"]
    text = load_error(tmp_path, raw)
    assert "model: Field required" in text


@pytest.mark.parametrize("partitioning, fragment", [
    ({"strategy": "natural", "num_parts": 2}, "apply to random/stratified"),
    ({"strategy": "random", "order": ["a"]}, "natural strategy only"),
    ({"strategy": "stratified", "num_parts": 3, "proportions": [1, 2]}, "num_parts (3) disagrees"),
    ({"strategy": "random", "proportions": "natural", "num_parts": 3}, "drop num_parts"),
    ({"strategy": "random", "proportions": [1, 0]}, "partitioning.proportions"),
    ({"strategy": "score_column"}, "needs score_field"),
    ({"strategy": "random", "within_source": True}, "apply to the score strategies"),
    ({"strategy": "natural", "difficulty": "margin_per_token"}, "apply to the score strategies"),
    ({"strategy": "easy_to_hard", "score_field": "s"}, "score_column only"),
    ({"selection": {"top_fraction": 0.3}}, "apply to strategy learnability_top"),
    ({"selection": {"strategy": "learnability_top", "top_fraction": 0}}, "partitioning.selection.top_fraction"),
    ({"selection": {"strategy": "learnability_top", "loss": "kl"}}, "partitioning.selection.loss"),
    ({"selection": {"strategy": "learnability_top", "probe": {"fraction": 1.5}}}, "selection.probe.fraction"),
])
def test_inconsistent_partitioning(tmp_path, partitioning, fragment):
    assert fragment in load_error(tmp_path, job_dict(partitioning=partitioning))


# --------------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------------
def test_overrides_are_parsed_as_yaml_and_applied(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), [
        "training.learning_rate=1e-6",
        "data.sources.0.max_rows=5",
        "partitioning.strategy=random",
        "partitioning.proportions=[1, 3]",
        "training.shuffle=false",
    ])
    assert job.training.learning_rate == 1e-6
    assert job.data.sources[0].max_rows == 5 and job.data.sources[1].max_rows is None
    assert job.partitioning.strategy is SplitStrategy.random
    assert job.partitioning.proportions == [1.0, 3.0]
    assert job.training.shuffle is False


def test_overrides_create_missing_sections(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), ["loss.beta=0.5"])
    assert job.loss.beta == 0.5


@pytest.mark.parametrize("override, key", [
    ("training.learning_rate=-1", "training.learning_rate"),
    ("training.learning_rate=fast", "training.learning_rate"),
    ("training.lr=1e-6", "training.lr"),
    ("data.sources.1.max_rows=0", "data.sources.1.max_rows"),
])
def test_bad_override_is_validated_like_the_file(tmp_path, override, key):
    assert f"  {key}:" in load_error(tmp_path, MINIMAL, [override])


def test_override_does_not_mutate_the_input():
    raw = copy.deepcopy(MINIMAL)
    out = apply_overrides(raw, ["data.sources.0.name=z", "loss.beta=1"])
    assert raw == MINIMAL
    assert out["data"]["sources"][0]["name"] == "z" and out["loss"] == {"beta": 1}


@pytest.mark.parametrize("override, fragment", [
    ("noequals", "expects key=value"),
    ("=3", "expects key=value"),
    ("data.sources.2.name=x", "data.sources has no item 2"),
    ("data.sources.first.name=x", "data.sources has no item first"),
    ("model.path.sub=x", "model.path is a value, not a mapping"),
])
def test_malformed_overrides(override, fragment):
    with pytest.raises(ConfigError, match="--set") as info:
        apply_overrides(MINIMAL, [override])
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------------
# Round trip and derived values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    {},
    {"partitioning": {"strategy": "stratified", "proportions": [1, 2], "seed": 3},
     "stages": [{"beta": 0.2}, {}], "training": {"adam_betas": [0.8, 0.95], "lr_scheduler": "cosine"},
     "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}, "init": "base"},
    {"partitioning": {"strategy": "easy_to_hard", "num_parts": 3, "within_source": True,
                      "difficulty": "margin_per_token",
                      "selection": {"strategy": "learnability_top", "top_fraction": 0.2, "loss": "nll",
                                    "probe": {"epochs": 2, "fraction": 0.5, "learning_rate": 1e-4}}}},
    {"partitioning": {"strategy": "score_column", "score_field": "quality", "score_order": "ascending"}},
])
def test_dump_parse_round_trip(extra):
    """dump_job -> YAML -> parse_job gives back an equal model (nothing lost in serialisation)."""
    job = parse_job(job_dict(**extra))
    again = parse_job(yaml.safe_load(dump_job(job)))
    assert again == job
    assert dump_job(again) == dump_job(job)


@pytest.mark.parametrize("partitioning, expected", [
    ({}, 2),
    ({"strategy": "natural", "order": ["b"]}, 1),
    ({"strategy": "natural", "order": ["b", "a"]}, 2),
    ({"strategy": "random"}, 2),
    ({"strategy": "random", "num_parts": 5}, 5),
    ({"strategy": "stratified", "proportions": [1, 1, 2]}, 3),
    ({"strategy": "stratified", "proportions": "natural"}, 2),
    ({"strategy": "easy_to_hard", "num_parts": 3}, 3),
    ({"strategy": "hard_to_easy", "proportions": [1, 1, 1, 1]}, 4),
    ({"strategy": "score_column", "score_field": "q"}, 2),
])
def test_num_partitions(partitioning, expected):
    assert parse_job(job_dict(partitioning=partitioning)).num_partitions() == expected


def test_num_partitions_natural_counts_all_sources():
    raw = copy.deepcopy(MINIMAL)
    raw["data"]["sources"].append({"name": "c", "path": ["c1.jsonl", "c2.parquet"]})
    job = parse_job(raw)
    assert job.num_partitions() == 3
    assert job.data.sources[2].paths == ["c1.jsonl", "c2.parquet"]


def test_loss_options_are_the_losses_own(tmp_path):
    job = load_job(write(tmp_path, job_dict(loss={"type": "dpop", "beta": 0.2, "dpop_lambda": 10})))
    assert (job.loss.type, job.loss.beta, job.loss.options) == ("dpop", 0.2, {"dpop_lambda": 10.0})
    assert load_job(write(tmp_path, job_dict(loss={"type": "robust"}))).loss.options == {"label_smoothing": 0.1}
    assert "unknown loss type 'dpo'" in load_error(tmp_path, job_dict(loss={"type": "dpo"}))
    text = load_error(tmp_path, job_dict(loss={"type": "robust", "label_smoothing": 0.5}))
    assert "label_smoothing" in text and "[0.0, 0.5)" in text


def test_stage_losses_merge_over_the_job_loss(tmp_path):
    """Same type: the stage's keys over the job's (options kept). Another type: that loss's defaults, the
    job's beta unless the stage sets it."""
    job = load_job(write(tmp_path, job_dict(
        loss={"type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1},
        stages=[{}, {"loss": {"beta": 0.3}}, {"loss": {"type": "ipo"}}, {"beta": 0.05, "loss": {"type": "hinge"}}],
        partitioning={"strategy": "random", "num_parts": 4})))
    losses = [job.stage_loss(i) for i in range(4)]
    assert [(x.type, x.beta, x.options) for x in losses] == [
        ("sigmoid", 0.2, {"label_smoothing": 0.1}), ("sigmoid", 0.3, {"label_smoothing": 0.1}),
        ("ipo", 0.2, {}), ("hinge", 0.05, {}),
    ]


def test_stage_loss_errors_name_the_stage(tmp_path):
    assert "stages[1].loss" in load_error(tmp_path, job_dict(stages=[{}, {"loss": {"type": "nope"}}]))
    text = load_error(tmp_path, job_dict(stages=[{"loss": {"type": "ipo", "label_smoothing": 0.1}}, {}]))
    assert "stages[0].loss" in text and "label_smoothing" in text
    assert "either beta or loss.beta" in load_error(tmp_path, job_dict(stages=[{"beta": 0.1, "loss": {"beta": 0.2}}, {}]))
