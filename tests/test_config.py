"""Config validation: values that would fail later (or silently) are refused with the key and what is expected."""

import pytest

from moedpo.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, words",
    [
        ("em.m_steps=0", "em.m_steps=0: expected an integer >= 1"),
        ("em.beta=-1", "em.beta=-1.0: expected a number > 0"),
        ("em.beta=0", "em.beta=0.0: expected a number > 0"),
        ("data.eval_fraction=1.5", "data.eval_fraction=1.5: expected a number in \\[0, 1\\)"),
        ("em.label_smoothing=0.5", "em.label_smoothing=0.5: expected a number in \\[0, 0.5\\)"),
        ("train.max_steps=0", "train.max_steps=0: expected an integer >= 1"),
        ("train.ddp_timeout=0", "train.ddp_timeout=0: expected seconds > 0"),
        ("train.parallel=deepspeed", "train.parallel='deepspeed': expected one of"),
        ("train.loss_type=kto", "train.loss_type='kto': expected one of"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides=[override])


def test_loss_types_reach_the_config():
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        assert load_config(overrides=[f"train.loss_type={loss_type}"]).train.loss_type == loss_type
    with pytest.raises(ConfigError, match="needs em.schedule=em"):
        load_config(overrides=["train.loss_type=ipo", "em.schedule=gumbel"])


def test_latent_model_and_guide_are_config_keys():
    config = load_config(overrides=["em.model=mypkg.models:hierarchical", "em.guide=mypkg.guides:q", "em.schedule=svi"])
    assert (config.em.model, config.em.guide) == ("mypkg.models:hierarchical", "mypkg.guides:q")


def test_config_command_lists_every_key_with_a_meaning_and_reloads(tmp_path, capsys):
    """``moedpo config`` prints every key (value, type, meaning) as YAML that loads back to the same config."""
    import dataclasses

    from moedpo.cli import main

    assert main(["config", "experts.num_experts=3", "em.scope=pair"]) == 0
    text = capsys.readouterr().out
    config = load_config(overrides=["experts.num_experts=3", "em.scope=pair"])
    keys = [
        f"{s.name}.{f.name}" for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))
    ]
    lines = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(lines) == len(keys)
    for line in lines:  # "  key: value  # type; meaning"
        assert "# " in line and "; " in line.split("# ", 1)[1], line
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == config


def test_a_misspelt_guide_name_says_what_is_accepted():
    with pytest.raises(ConfigError, match="expected amortized, or your own guide as package.module:name"):
        load_config(overrides=["em.guide=amortised"])


def test_old_train_key_names_load_with_one_future_warning(tmp_path):
    """TRL's names (``per_device_train_batch_size``, ``eval_steps``, ``save_steps``, ``logging_steps``,
    ``lr_scheduler_type``) replace moedpo 0.1's; the old ones load for one release with a single FutureWarning
    that names the new keys (before: ``unknown key 'train.eval_steps'``)."""
    old = ["train.batch_size=8", "train.eval_every=5", "train.checkpoint_every=4", "train.logging_every=2"]
    with pytest.warns(FutureWarning) as caught:
        config = load_config(overrides=[*old, "train.lr_scheduler=linear"])
    assert len(caught) == 1
    message = str(caught[0].message)
    for new in ("per_device_train_batch_size", "eval_steps", "save_steps", "logging_steps", "lr_scheduler_type"):
        assert f"train.{new}" in message, new
    t = config.train
    assert (t.per_device_train_batch_size, t.eval_steps, t.save_steps, t.logging_steps) == (8, 5, 4, 2)
    assert t.lr_scheduler_type == "linear"
    new = load_config(overrides=["train.per_device_train_batch_size=8", "train.eval_steps=5", "train.save_steps=4"])
    assert (new.train.per_device_train_batch_size, new.train.eval_steps, new.train.save_steps) == (8, 5, 4)

    path = tmp_path / "old.yaml"
    path.write_text("train:\n  batch_size: 3\n  eval_every: 7\n")
    with pytest.warns(FutureWarning, match=f"train.batch_size \\({path}\\)") as caught:
        config = load_config(path, ["train.eval_steps=9"])  # an override of the new name beats the file's old one
    assert len(caught) == 1
    assert (config.train.per_device_train_batch_size, config.train.eval_steps) == (3, 9)


def test_one_source_giving_a_key_by_both_names_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="override: both train.batch_size .* and train.per_device_train_batch_size"):
        load_config(overrides=["train.batch_size=8", "train.per_device_train_batch_size=4"])
    path = tmp_path / "both.yaml"
    path.write_text("train:\n  eval_every: 7\n  eval_steps: 5\n")
    with pytest.raises(ConfigError, match=f"{path}: both train.eval_every .* keep only train.eval_steps"):
        load_config(path)


def test_the_cli_prints_one_deprecation_message(tmp_path):
    """From the command line: one FutureWarning on stderr for several old keys, and the resolved config shows the
    new names."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "moedpo.cli", "config", "train.batch_size=8", "train.eval_every=5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "FutureWarning" in line]
    assert len(warned) == 1 and "use train.per_device_train_batch_size, train.eval_steps" in warned[0]
    assert "  per_device_train_batch_size: 8  #" in result.stdout and "  eval_steps: 5  #" in result.stdout
    assert "batch_size: 8" not in result.stdout.replace("per_device_train_batch_size: 8", "")
