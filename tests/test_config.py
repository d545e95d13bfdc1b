"""The configuration tree and the command lines generated from it (no model is loaded here)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
from support import REPO

from plm_core.cli_args import HelpFormatter, add_config_options, flag_name, parse_config
from plm_core.config import EngineConfig, MediaConfig, flatten, opt
from server.config import ServerConfig, build_parser
from server.config import parse_config as parse_server_config


def _leaves(cls: type) -> list[dataclasses.Field]:
    out = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out += _leaves(f.default_factory)
        else:
            out.append(f)
    return out


def test_config_tree_is_frozen_and_routes_flat_names():
    config = EngineConfig.from_flat(model="m", max_num_seqs=3, block_size=8, max_num_frames=5)
    assert (config.scheduler.max_num_seqs, config.cache.block_size) == (3, 8)
    assert config.media.max_num_frames == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scheduler.max_num_seqs = 4  # type: ignore[misc]
    changed = config.replace(enable_prefix_caching=False)
    assert not changed.cache.enable_prefix_caching and config.cache.enable_prefix_caching
    assert flatten(changed)["max_num_seqs"] == 3
    with pytest.raises(TypeError, match="max_num_seq"):
        EngineConfig.from_flat(max_num_seq=3)


@pytest.mark.parametrize(
    "values",
    [
        dict(max_num_seqs=0),
        dict(block_size=0),
        dict(gpu_memory_utilization=1.5),
        dict(max_num_tiles=0),
    ],
)
def test_config_refuses_values_that_could_only_fail_later(values):
    with pytest.raises(ValueError):
        EngineConfig.from_flat(**values)


def test_every_leaf_field_is_an_option_of_plm_serve():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in _leaves(EngineConfig) + _leaves(ServerConfig):
        if "help" in f.metadata:
            assert flag_name(f.name) in flags, f.name


def test_help_prints_each_default_once_and_never_none():
    text = build_parser().format_help()
    assert "(default: None)" not in text
    options = text.split("\n  --")[1:]
    assert len(options) > 40
    for option in options:
        assert " ".join(option.split()).count("(default") <= 1, option
    assert "--debug-fail-after-steps" not in text  # hidden test options


def test_parsed_options_build_the_config_tree():
    config = parse_server_config(
        [
            "--model",
            "/models/plm",
            "--max-num-seqs",
            "7",
            "--no-prefix-caching",
            "--allowed-origins",
            "https://a.example, https://b.example",
            "--scheduling-policy",
            "priority",
            "--max-num-frames",
            "12",
            "--port",
            "9000",
        ]
    )
    assert config.engine.model == "/models/plm" and config.port == 9000
    assert config.engine.scheduler.max_num_seqs == 7
    assert config.engine.scheduler.scheduling_policy == "priority"
    assert not config.engine.cache.enable_prefix_caching
    assert config.engine.media.max_num_frames == 12
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert parse_server_config([]) == ServerConfig()


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        parse_server_config(["--gpu-memory-utilization", "1.5"])
    with pytest.raises(SystemExit):
        parse_server_config(["--max-num-seqs", "0"])
    assert "max_num_seqs must be at least 1" in capsys.readouterr().err


def test_a_new_option_is_one_field():
    """The generator needs nothing but the field: flag, help, default, type and parse all follow."""

    @dataclasses.dataclass(frozen=True)
    class Extra:
        """Extra: a config someone adds."""

        warmup_steps: int = opt(3, "steps run before serving")
        tag: str | None = opt(None, "a free-form tag")
        verbose: bool = opt(False, "say more")

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_config_options(parser, Extra)
    assert "steps run before serving (default: 3)" in " ".join(parser.format_help().split())
    got = parse_config(parser, Extra, ["--warmup-steps", "5", "--verbose"])
    assert got == Extra(warmup_steps=5, tag=None, verbose=True)


def test_llm_options_reach_the_processor_once(tiny_checkpoint):
    """`LLM(max_num_frames=8)` is the processor's cap: one field, no second place to disagree."""
    from plm_core import LLM

    llm = LLM(str(tiny_checkpoint), device="cpu", max_num_frames=8, max_num_tiles=2)
    assert llm.processor.media == llm.engine_config.media
    assert llm.engine_config.media == MediaConfig(
        max_num_frames=8, max_num_tiles=2, allowed_local_media_path="/"
    )


@pytest.mark.parametrize("module", ["server", "plm_core"])
def test_both_command_lines_share_the_engine_options(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in ("--max-num-seqs", "--block-size", "--max-num-frames", "--scheduling-policy"):
        assert flag in out, (module, flag)


def test_repeated_options_keep_each_value_whole():
    """`python -m plm_core --image a.jpg --image b.png`: two paths, not the characters of one."""
    from plm_core.__main__ import ChatOptions

    parser = argparse.ArgumentParser()
    add_config_options(parser, ChatOptions)
    chat = parse_config(parser, ChatOptions, ["--image", "photo.jpg", "--image", "b.png"])
    assert chat.image == ("photo.jpg", "b.png") and chat.video == ()
    servers = parse_server_config(["--allowed-origins", "https://a.example, https://b.example"])
    assert servers.allowed_origins == ("https://a.example", "https://b.example")


def test_the_one_off_chat_reads_an_image_file(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    from plm_core.__main__ import main

    path = tmp_path / "a photo.png"
    Image.new("RGB", (64, 48), (200, 40, 10)).save(path)
    argv = ["--model", str(tiny_checkpoint), "--image", str(path), "--max-tokens", "2"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "2 generated" in out + err
