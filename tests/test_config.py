"""Tests for robustsparse.config: shipped config, overrides, type/range checks, YAML errors, and fuzzing."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from robustsparse.config import (
    RunConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_config_path,
    shipped_configs,
)
from robustsparse.errors import UserError

# Every "section.field" key of RunConfig, e.g. "train.epochs".
_DEFAULT = RunConfig()
FIELD_KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(RunConfig)
              for f in dataclasses.fields(getattr(_DEFAULT, s.name))]


def _error(path=None, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


def _write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- the shipped config and round trips


def test_field_keys_cover_known_fields():
    assert {"attack.eps", "train.epochs", "train.milestones", "model.options", "eval.suite", "data.root"} \
        <= set(FIELD_KEYS)


def test_shipped_digits_config():
    assert "digits_pgdat" in shipped_configs()
    cfg = load_config("digits_pgdat")
    assert isinstance(cfg, RunConfig)
    assert cfg.attack.eps == 0.1 and cfg.attack.norm == "Linf" and cfg.attack.steps == 10
    assert cfg.train.method == "pgd_at"
    assert cfg.data.name == "digits" and cfg.data.crop_padding == 1
    assert cfg.model.options == {"width": 64}
    assert cfg.train_alpha == pytest.approx(2.5 * 0.1 / 10)
    # the ".yaml" suffix is accepted for a shipped name, and resolves to the same file
    assert resolve_config_path("digits_pgdat.yaml") == resolve_config_path("digits_pgdat")
    assert load_config("digits_pgdat.yaml") == cfg


def test_to_dict_round_trips():
    cfg = load_config("digits_pgdat", ["train.milestones=[0.3, 0.6]", "model.mean=[0.5]", "model.std=[0.25]",
                                       "eval.n=17", "attack.alpha=0.02"])
    d = cfg.to_dict()
    assert set(d) == {"data", "model", "attack", "train", "prune", "eval", "ofa"}
    again = config_from_dict(d)
    assert again == cfg and again.to_dict() == d
    # also through YAML text, as a run folder's config.yaml stores it
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d, sort_keys=False))) == cfg
    # to_dict is a copy: mutating it does not change the config
    d["model"]["options"]["width"] = 3
    assert cfg.model.options == {"width": 64}


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig().validate()
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert load_config(None, []) == cfg


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "empty.yaml", "")) == RunConfig()
    assert load_config(_write(tmp_path, "comment.yaml", "# nothing\n")) == RunConfig()


# ---------------------------------------------------------------- overrides


def test_override_int_float_bool():
    cfg = load_config("digits_pgdat", ["train.epochs=3", "train.lr=0.01", "train.nesterov=true",
                                       "attack.random_start=false", "data.flip=yes"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 0.01
    assert cfg.train.nesterov is True and cfg.attack.random_start is False and cfg.data.flip is True


def test_int_for_float_field_becomes_float():
    cfg = load_config("digits_pgdat", ["train.lr=1", "train.weight_decay=0", "train.milestones=[0, 1]"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float
    assert cfg.train.milestones == [0.0, 1.0] and all(type(m) is float for m in cfg.train.milestones)


def test_override_list():
    cfg = load_config("digits_pgdat", ["train.milestones=[0.3,0.6]", "train.schedule=multistep"])
    assert cfg.train.milestones == [0.3, 0.6]
    assert load_config(None, ["train.milestones=[]"]).train.milestones == []


def test_override_dict_merges_into_file_options(tmp_path):
    path = _write(tmp_path, "c.yaml", "model:\n  name: cnn\n  options: {width: 64, hidden: 32}\n")
    cfg = load_config(path, ["model.options={width: 16}"])
    assert cfg.model.options == {"width": 16, "hidden": 32}
    # a dotted key reaches into the mapping as well
    assert load_config(path, ["model.options.width=8"]).model.options == {"width": 8, "hidden": 32}
    # new keys are added, the file's other sections untouched
    cfg = load_config("digits_pgdat", ["model.options={dropout: 0.1}"])
    assert cfg.model.options == {"width": 64, "dropout": 0.1}
    assert cfg.model.name == "cnn" and cfg.attack.eps == 0.1


def test_null_for_optional_fields():
    cfg = load_config("digits_pgdat", ["attack.alpha=0.01", "eval.eps=0.05"])
    assert cfg.attack.alpha == 0.01 and cfg.train_alpha == 0.01
    cfg = load_config("digits_pgdat", ["attack.alpha=null", "eval.eps=~", "eval.n=", "data.root=null"])
    assert cfg.attack.alpha is None and cfg.eval.eps is None and cfg.eval.n is None and cfg.data.root is None
    assert cfg.train_alpha == pytest.approx(2.5 * 0.1 / 10)


def test_null_refused_for_non_optional_field():
    msg = _error(None, ["train.epochs=null"])
    assert "train.epochs" in msg


def test_later_override_wins_and_string_values():
    cfg = load_config(None, ["train.epochs=3", "train.epochs=5", "data.root=/some/where", "data.name=digits"])
    assert cfg.train.epochs == 5 and cfg.data.root == "/some/where"


def test_parse_overrides_tree():
    assert parse_overrides(["train.epochs=5", "model.options={width: 32}", "a.b.c=x=y"]) == {
        "train": {"epochs": 5}, "model": {"options": {"width": 32}}, "a": {"b": {"c": "x=y"}}}
    assert parse_overrides([" train.epochs =7"]) == {"train": {"epochs": 7}}
    assert parse_overrides([]) == {}


# ---------------------------------------------------------------- type errors and unknown keys


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.lr=true", "train.lr"),
    ("train.lr=fast", "train.lr"),
    ("train.nesterov=1", "train.nesterov"),
    ("train.milestones=0.5", "train.milestones"),
    ("train.milestones=[0.5, x]", "train.milestones[1]"),
    ("model.options=[1, 2]", "model.options"),
    ("model.mean=[true]", "model.mean[0]"),
    ("data.name=3", "data.name"),
    ("eval.n=1.5", "eval.n"),
    ("train.epochs.x=1", "train.epochs"),
])
def test_wrong_type_is_user_error_naming_key(override, key):
    msg = _error("digits_pgdat", [override])
    assert key in msg


def test_bool_refused_for_int_field_in_file(tmp_path):
    msg = _error(_write(tmp_path, "c.yaml", "train:\n  epochs: true\n"))
    assert "train.epochs" in msg and "int" in msg


def test_unknown_key_suggests_the_closest():
    msg = _error("digits_pgdat", ["train.epoch=3"])
    assert "train.epoch" in msg and "train.epochs" in msg
    msg = _error(None, ["attack.epsilon=0.1"])
    assert "attack.eps" in msg


def test_unknown_key_in_file_suggests_the_closest(tmp_path):
    msg = _error(_write(tmp_path, "c.yaml", "train:\n  lrr: 0.1\n"))
    assert "train.lrr" in msg and "train.lr" in msg


def test_unknown_section():
    msg = _error(None, ["optimizer.lr=0.1"])
    assert "optimizer" in msg
    assert "train" in msg  # lists (or suggests) the valid sections
    msg = _error(None, ["trian.epochs=3"])
    assert "trian" in msg and "train" in msg


def test_section_that_is_not_a_mapping():
    msg = _error(None, ["train=5"])
    assert "train" in msg and "mapping" in msg


@pytest.mark.parametrize("bad", ["train.epochs", "train.epochs:3", "", "nothing"])
def test_override_without_equals(bad):
    with pytest.raises(UserError, match="section.key=value"):
        parse_overrides([bad])
    with pytest.raises(UserError):
        load_config("digits_pgdat", [bad])


@pytest.mark.parametrize("bad", ["train..epochs=3", ".epochs=3", "train.=3", "=3"])
def test_override_with_empty_key_part(bad):
    with pytest.raises(UserError, match="empty key part"):
        parse_overrides([bad])


def test_override_value_not_yaml():
    with pytest.raises(UserError, match="not valid YAML"):
        parse_overrides(["train.milestones=[0.1, 0.2"])
    with pytest.raises(UserError, match="not valid YAML"):
        parse_overrides(["model.options={width: 8"])


def test_conflicting_overrides():
    with pytest.raises(UserError, match="conflicts"):
        parse_overrides(["train=5", "train.epochs=3"])


# ---------------------------------------------------------------- range checks


@pytest.mark.parametrize("overrides, key", [
    (["attack.eps=0"], "attack.eps"),
    (["attack.eps=-0.1"], "attack.eps"),
    (["attack.eps=1.5"], "attack.eps"),
    (["attack.steps=0"], "attack.steps"),
    (["attack.alpha=0"], "attack.alpha"),
    (["train.weight_decay=-0.0001"], "train.weight_decay"),
    (["train.momentum=1.0"], "train.momentum"),
    (["train.momentum=-0.1"], "train.momentum"),
    (["train.batch_size=1"], "train.batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.lr=0"], "train.lr"),
    (["train.trades_beta=-1"], "train.trades_beta"),
    (["train.milestones=[0.5, 1.5]"], "train.milestones"),
    (["train.milestones=[-0.1]"], "train.milestones"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs"),
    (["train.epochs=3", "train.warmup_epochs=3.5"], "train.warmup_epochs"),
    (["train.val_every=0"], "train.val_every"),
    (["train.val_attack_steps=0"], "train.val_attack_steps"),
    (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps"),
    (["data.crop_padding=-1"], "data.crop_padding"),
    (["data.val_size=-5"], "data.val_size"),
    (["eval.eps=0"], "eval.eps"),
    (["eval.n=0"], "eval.n"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["train.device=gpu"], "train.device"),
])
def test_out_of_range_is_user_error_naming_key(overrides, key):
    msg = _error("digits_pgdat", overrides)
    assert key in msg


def test_range_boundaries_accepted():
    cfg = load_config("digits_pgdat", ["attack.eps=1.0", "train.momentum=0", "train.weight_decay=0",
                                       "train.batch_size=2", "train.epochs=1", "train.milestones=[0, 1]",
                                       "train.warmup_epochs=1", "train.checkpoint_every_steps=0",
                                       "data.val_size=0", "train.device=cuda:1"])
    assert cfg.attack.eps == 1.0 and cfg.train.momentum == 0.0 and cfg.train.batch_size == 2


def test_l2_eps_may_exceed_one():
    cfg = load_config("digits_pgdat", ["attack.norm=L2", "attack.eps=1.5"])
    assert cfg.attack.norm == "L2" and cfg.attack.eps == 1.5
    assert "attack.eps" in _error("digits_pgdat", ["attack.norm=L2", "attack.eps=0"])


@pytest.mark.parametrize("override", ["attack.eps=.nan", "train.lr=.nan"])
def test_nan_is_refused(override):
    cfg = None
    try:
        cfg = load_config("digits_pgdat", [override])
    except UserError as exc:
        assert override.split("=")[0] in str(exc)
    assert cfg is None, f"{override} was accepted: eps={cfg.attack.eps}, lr={cfg.train.lr}"


# ---------------------------------------------------------------- choices and combinations


@pytest.mark.parametrize("override, key, allowed", [
    ("train.method=madry", "train.method", "pgd_at"),
    ("train.schedule=linear", "train.schedule", "cosine"),
    ("attack.norm=linf", "attack.norm", "Linf"),
    ("attack.norm=L1", "attack.norm", "L2"),
    ("eval.split=validation", "eval.split", "val"),
])
def test_unknown_choice(override, key, allowed):
    msg = _error("digits_pgdat", [override])
    assert key in msg and allowed in msg and override.split("=")[1] in msg


def test_trades_with_l2_refused():
    msg = _error("digits_pgdat", ["train.method=trades", "attack.norm=L2"])
    assert "trades" in msg and "attack.norm" in msg
    assert load_config("digits_pgdat", ["train.method=trades"]).train.method == "trades"


def test_mean_without_std_refused():
    assert "model.std" in _error("digits_pgdat", ["model.mean=[0.5]"])
    assert "model.mean" in _error("digits_pgdat", ["model.std=[0.5]"])


@pytest.mark.parametrize("suite, word", [
    ("clean,pgd-0", "pgd-0"),
    ("foo", "foo"),
    ("clean,pgd-10x0", "pgd-10x0"),
    ("clean,clean", "twice"),
    ("' , '", "empty"),
])
def test_bad_eval_suite(suite, word):
    msg = _error("digits_pgdat", [f"eval.suite={suite}"])
    assert word in msg


def test_good_eval_suites():
    for suite in ("clean", "clean,pgd-20,autoattack", "fgsm,pgd-5x2,apgd-ce,square", "CLEAN, PGD-3"):
        assert load_config("digits_pgdat", [f"eval.suite={suite}"]).eval.suite == suite


# ---------------------------------------------------------------- YAML files


def test_malformed_yaml_names_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "train:\n  epochs: [1\n  lr: 0.1\n")
    msg = _error(path)
    assert "not valid YAML" in msg and "line 3" in msg and path in msg


def test_malformed_yaml_tab_indentation(tmp_path):
    path = _write(tmp_path, "tab.yaml", "train:\n\tepochs: 3\n")
    msg = _error(path)
    assert "not valid YAML" in msg and "line 2" in msg


def test_yaml_list_not_mapping(tmp_path):
    msg = _error(_write(tmp_path, "list.yaml", "- train\n- epochs\n"))
    assert "mapping" in msg
    msg = _error(_write(tmp_path, "scalar.yaml", "42\n"))
    assert "mapping" in msg


def test_yaml_section_not_mapping(tmp_path):
    msg = _error(_write(tmp_path, "c.yaml", "train: 5\n"))
    assert "train" in msg and "mapping" in msg


def test_missing_config_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = _error(missing)
    assert "nope.yaml" in msg and "digits_pgdat" in msg  # names the shipped configs
    assert "nope" in _error("nope")


def test_directory_as_config_path(tmp_path):
    msg = _error(str(tmp_path))
    assert "cannot read config" in msg and str(tmp_path) in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_config_file(tmp_path):
    path = _write(tmp_path, "secret.yaml", "train: {epochs: 3}\n")
    os.chmod(path, 0)
    try:
        assert "cannot read config" in _error(path)
    finally:
        os.chmod(path, 0o600)


def test_binary_config_file_is_user_error(tmp_path):
    p = tmp_path / "weights.yaml"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(UserError):
        load_config(str(p))


@pytest.mark.parametrize("value", ["!!int abc", "!!float x", "!!bool maybe", "!!timestamp x", "!!int"])
def test_bad_explicit_yaml_tag_is_user_error(value, tmp_path):
    with pytest.raises(UserError):
        parse_overrides([f"train.epochs={value}"])
    with pytest.raises(UserError):
        load_config(_write(tmp_path, "tag.yaml", f"train:\n  epochs: {value}\n"))


def test_good_explicit_yaml_tag():
    assert load_config(None, ["train.epochs=!!int 4", "data.root=!!str 12"]).train.epochs == 4
    with pytest.raises(UserError, match="not valid YAML"):
        parse_overrides(["data.root=!!python/name:os.system"])


# ---------------------------------------------------------------- property tests

# Arbitrary text, except "!" (explicit YAML tags: see test_bad_explicit_yaml_tag_is_user_error, a known bug).
_TEXT = st.text(st.characters(blacklist_characters="!", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(_TEXT, max_size=6))
def test_parse_overrides_only_user_error(items):
    try:
        tree = parse_overrides(items)
    except UserError as exc:
        assert str(exc)
        return
    assert isinstance(tree, dict)
    for item in items:  # every override is in the tree under its dotted key
        key = item.split("=", 1)[0].strip()
        node = tree
        for part in key.split("."):
            assert isinstance(node, dict) and part in node
            node = node[part]


_YAMLISH = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["true", "false", "yes", "no", "null", "~", "", ".inf", "-.inf", "1e3", "1.0e-3",
                     "[0.3, 0.6]", "[]", "[1, 2", "{width: 8}", "{}", "{width: 8", "cosine", "multistep",
                     "trades", "standard", "L2", "Linf", "val", "clean,pgd-2", "pgd-0", "cuda:0", "cpu",
                     "digits", "cnn", "'quoted'", "\"x\"", "a: b", "- 1", "&a [*a]", "*nope", "|", ">",
                     "0x10", "0o7", "1_000", "2024-01-01", "[[0.5]]", "{a: {b: 1}}"]),
    _TEXT,
)
_KEYS = st.one_of(
    st.sampled_from(FIELD_KEYS),
    st.sampled_from(FIELD_KEYS).map(lambda k: k[:-1]),  # near misses: did-you-mean
    st.sampled_from(["train", "attack", "model.options.width", "data.options.val_size", "foo.bar",
                     "train.epochs.x", "eval"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_KEYS, _YAMLISH), max_size=5), st.booleans())
def test_load_config_only_user_error_or_valid(pairs, from_file):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config("digits_pgdat" if from_file else None, overrides)
    except UserError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, RunConfig)
    cfg.validate()  # idempotent: a returned config is valid
    t, a = cfg.train, cfg.attack
    assert t.epochs >= 1 and t.batch_size >= 2 and 0 <= t.momentum < 1 and t.weight_decay >= 0
    assert all(0 <= m <= 1 for m in t.milestones)
    assert a.eps > 0 and (a.norm == "L2" or a.eps <= 1)
    assert t.method in ("standard", "pgd_at", "trades") and a.norm in ("Linf", "L2")
    assert type(t.epochs) is int and type(t.lr) is float and type(a.eps) is float


def test_exponent_floats_without_a_dot_are_accepted():
    # PyYAML (YAML 1.1) parses 5e-4 as a string; users mean a float
    cfg = load_config("digits_pgdat", ["train.lr=5e-4", "prune.search_lr=1E-3"])
    assert cfg.train.lr == 5e-4 and cfg.prune.search_lr == 1e-3
    with pytest.raises(UserError, match="train.lr"):
        load_config("digits_pgdat", ["train.lr=fast"])
