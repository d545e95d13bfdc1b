"""Checkpoint lookup and config parsing: local dirs, hub ids via the HF cache, layouts, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from plm_core.checkpoint import ALLOW_PATTERNS, CheckpointError, resolve_checkpoint
from plm_core.model_config import ConfigError, load_model_config


def _fake_hub_cache(
    tmp_path, checkpoint, repo="facebook/Perception-LM-1B", commit="a" * 40, ref="main"
):
    root = tmp_path / "hub"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (snap / f.name).symlink_to(f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(commit)
    return root, snap


def test_local_directory_resolves_and_parses(tiny_checkpoint):
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    cfg = load_model_config(tiny_checkpoint)
    assert cfg.image_token_id == 128002 and cfg.video_token_id == 128003
    assert cfg.eos_token_ids == (128001, 128009) and cfg.bos_token_id == 128000
    assert cfg.text.rope_scaling["factor"] == 32.0
    assert cfg.processor.tile_size == 56 and cfg.processor.tokens_per_tile == 4
    assert cfg.vision.use_cls_token is True
    assert "<|image|>" in cfg.chat_template


def test_hub_id_offline_from_cache(tiny_checkpoint, tmp_path, monkeypatch):
    root, snap = _fake_hub_cache(tmp_path, tiny_checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = dict(cache_dir=str(root), progress=False)
    assert resolve_checkpoint("facebook/Perception-LM-1B", **options) == snap
    # an explicit revision (commit hash) resolves to that snapshot
    assert resolve_checkpoint("facebook/Perception-LM-1B", revision="a" * 40, **options) == snap


def test_hub_id_offline_missing_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE.*facebook/Perception-LM-8B"):
        resolve_checkpoint("facebook/Perception-LM-8B", cache_dir=str(tmp_path), progress=False)


def test_download_asks_only_for_hf_files(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(**kwargs):
        calls.update(kwargs)
        return str(tiny_checkpoint)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_checkpoint("facebook/Perception-LM-3B", revision="v1", progress=False)
    assert calls["repo_id"] == "facebook/Perception-LM-3B" and calls["revision"] == "v1"
    assert calls["allow_patterns"] == ALLOW_PATTERNS and calls["local_files_only"] is False
    patterns = " ".join(ALLOW_PATTERNS)
    assert all(name not in patterns for name in ("consolidated", ".pth", "params.json"))


def test_missing_files_are_named(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "tokenizer.json").unlink()
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer\.json, \*\.safetensors"):
        resolve_checkpoint(broken)


def test_wrong_model_type(tiny_checkpoint, tmp_path):
    other = tmp_path / "llava"
    shutil.copytree(tiny_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "llava"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'llava' model.*PerceptionLM"):
        load_model_config(other)


def test_not_a_directory_or_hub_id():
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        resolve_checkpoint("./no/such/dir")


def test_transformers4_layout_parses_the_same(tiny_checkpoint, tmp_path):
    """The hub's configs come from transformers 4.x: rope_scaling + rope_theta, torch_dtype."""
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    cfg = json.loads((old / "config.json").read_text())
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    text.pop("head_dim")
    cfg["torch_dtype"] = cfg.pop("dtype")
    (old / "config.json").write_text(json.dumps(cfg))
    template = (old / "chat_template.jinja").read_text()
    (old / "chat_template.jinja").unlink()
    (old / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    a, b = load_model_config(tiny_checkpoint), load_model_config(old)
    assert a.text == b.text and a.processor == b.processor and a.chat_template == b.chat_template
    assert b.checkpoint_dtype == "float32"


def test_nested_processor_config_layout(tiny_checkpoint, tmp_path):
    """transformers 5 nests the image/video processor configs inside processor_config.json."""
    new = tmp_path / "new"
    shutil.copytree(tiny_checkpoint, new)
    image = json.loads((new / "preprocessor_config.json").read_text())
    video = json.loads((new / "video_preprocessor_config.json").read_text())
    proc = json.loads((new / "processor_config.json").read_text())
    proc.update(image_processor=image, video_processor=video)
    (new / "processor_config.json").write_text(json.dumps(proc))
    (new / "preprocessor_config.json").unlink()
    (new / "video_preprocessor_config.json").unlink()
    assert load_model_config(new).processor == load_model_config(tiny_checkpoint).processor


def test_weight_errors_are_named(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from plm_core.model.perception_lm import build_model

    broken = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, broken)
    (st,) = broken.glob("*.safetensors")
    tensors = load_file(st)
    dropped = tensors.pop("model.language_model.norm.weight")
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"lacks 1 weights.*language_model\.norm\.weight"):
        build_model(load_model_config(broken), device=torch.device("cpu"), dtype=torch.float32)
    tensors["model.language_model.norm.weight"] = torch.cat([dropped, dropped])
    save_file(tensors, st, metadata={"format": "pt"})
    shape = r"norm\.weight has shape \(128,\), the config implies \(64,\)"
    with pytest.raises(ConfigError, match=shape):
        build_model(load_model_config(broken), device=torch.device("cpu"), dtype=torch.float32)


def test_cpu_lm_head_is_laid_out_for_streaming_with_the_same_values(tiny_checkpoint):
    """On a CPU the LM head's weight is a transposed view of a contiguous [H, V] copy (the fast
    layout for the logits' matmul); its values are the checkpoint's, and logits are unchanged."""
    import torch
    from safetensors.torch import load_file

    from plm_core.model.perception_lm import build_model, checkpoint_files

    cfg = load_model_config(tiny_checkpoint)
    model = build_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    weight = model.lm_head.weight
    vocab, hidden = cfg.text.vocab_size, cfg.text.hidden_size
    assert weight.shape == (vocab, hidden) and weight.stride() == (1, vocab)
    saved = {}
    for file in checkpoint_files(cfg.path):
        saved.update(load_file(str(file)))
    key = next(k for k in saved if k.endswith("lm_head.weight"))
    assert torch.equal(weight, saved[key])
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.lm_head(x), torch.nn.functional.linear(x, saved[key]))
