"""`r1kit VERB --help`: every verb answers it, and every stage lists every config key it reads."""
import dataclasses
import json
import typing

import pytest

from r1kit.cli import VERBS, main
from r1kit.config import config_keys, field_meanings, key_of, toml_literal
from r1kit.recipe import SECTIONS, VERB_OF, DemoConfig
from r1kit.stages.distill import DistillConfig
from r1kit.stages.evaluate import EvalConfig
from r1kit.stages.grpo import GRPOConfig
from r1kit.stages.pretrain import PretrainConfig
from r1kit.stages.sft import SFTConfig

STAGES = {"pretrain": PretrainConfig, "sft": SFTConfig, "grpo": GRPOConfig, "distill": DistillConfig,
          "eval": EvalConfig, "demo": DemoConfig}


def help_text(verb: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def written(value) -> str:
    """A default as a user types it in TOML, spelled out here rather than by the code under test."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    return toml_literal(value)


def all_fields(cls, prefix=""):
    """(dotted key, default) of every leaf field of `cls`, nested configs included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from all_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield prefix + key_of(f.name), default  # async_ is written `async`


@pytest.mark.parametrize("verb", list(STAGES))
def test_help_lists_every_config_key_with_its_default(verb, capsys):
    lines = help_text(verb, capsys).splitlines()
    for key, default in all_fields(STAGES[verb]):
        entry = [ln for ln in lines if ln.startswith(f"  {key} (")]
        assert len(entry) == 1, f"{verb} --help does not list {key}"
        if default is None:
            assert entry[0].endswith("= unset"), entry[0]
        else:
            assert entry[0].endswith(f"= {written(default)}"), (entry[0], default)


@pytest.mark.parametrize("cls", sorted({*STAGES.values(), *SECTIONS.values()}, key=lambda c: c.__name__))
def test_every_config_field_has_a_meaning(cls):
    for key, _typ, _default, meaning in config_keys(cls):
        assert meaning.strip(), f"{cls.__name__}.{key} has no meaning: add a `# ...` comment to the field"


def test_demo_help_names_every_section_and_where_its_keys_are(capsys):
    text = help_text("demo", capsys)
    for name, cls in SECTIONS.items():
        if cls is not DemoConfig:
            assert f"[{name}]" in text and f"r1kit {VERB_OF[cls]} --help" in text
            assert STAGES[VERB_OF[cls]] is cls  # the verb named really lists that class's keys


def test_meanings_come_from_the_field_comments():
    @dataclasses.dataclass
    class Example:
        a: int = 1  # the trailing comment
        # a comment block
        # just above
        b: dict = dataclasses.field(default_factory=lambda: {
            "x": 1})
        c: str = "no # inside a string is a comment"
        d: list = dataclasses.field(default_factory=list)  # spans
    assert field_meanings(Example) == {"a": "the trailing comment", "b": "a comment block just above", "c": "",
                                       "d": "spans"}


def test_every_verb_answers_help_and_explains_every_option(capsys):
    import argparse
    import importlib
    for verb, (module_name, _) in VERBS.items():
        assert "usage: r1kit " + verb in help_text(verb, capsys)
        p = argparse.ArgumentParser()
        importlib.import_module(module_name).add_args(p)
        silent = [a.dest for a in p._actions if not a.help]
        assert not silent, f"r1kit {verb}: options without a help line: {silent}"


def test_eval_out_help_says_it_is_the_json_file(capsys):
    text = help_text("eval", capsys)
    out_help = text[text.index("  --out OUT"):].split("\n\n")[0]
    assert "eval.json file" in out_help and "directory" not in out_help
