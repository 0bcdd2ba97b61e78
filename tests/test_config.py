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
