"""Native format round trips, sharding, and the errors a user sees for bad checkpoints and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import flatstack
from flatstack.checkpoint import CheckpointError, read_safetensors
from flatstack.cli import main
from flatstack.model import Transformer, preset


def tiny(**overrides) -> Transformer:
    return Transformer(preset("grok-1-tiny", **overrides)).init_weights(seed=0).eval()


def test_roundtrip_exact(tmp_path):
    model = tiny()
    flatstack.save(model, tmp_path / "ck")
    loaded = flatstack.load(tmp_path / "ck")
    assert not loaded.training
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def test_sharded_above_limit(tmp_path):
    model = tiny()
    flatstack.save(model, tmp_path / "ck", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "ck" / "model.safetensors").exists()
    loaded = flatstack.load(tmp_path / "ck", dtype=torch.bfloat16)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t.to(torch.bfloat16)), name


def test_save_replaces_previous_whole(tmp_path):
    flatstack.save(tiny(), tmp_path / "ck")
    flatstack.save(tiny(n_layers=1), tmp_path / "ck")
    assert flatstack.load(tmp_path / "ck").cfg.n_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_named(tmp_path):
    flatstack.save(tiny(), tmp_path / "ck")
    rewrite(tmp_path / "ck", lambda t: t.pop("layers.1.attn.wk.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.1.attn.wk.weight' \(expected shape \[32, 64\]"):
        flatstack.load(tmp_path / "ck")


def test_wrong_shape_named(tmp_path):
    flatstack.save(tiny(), tmp_path / "ck")
    rewrite(tmp_path / "ck", lambda t: t.__setitem__("layers.0.ffn.w_down", torch.zeros(8, 64, 300)))
    expected = r"'layers.0.ffn.w_down' has shape \[8, 64, 300\], expected \[8, 64, 344\]"
    with pytest.raises(CheckpointError, match=expected):
        flatstack.load(tmp_path / "ck")


def test_unexpected_tensor_named(tmp_path):
    flatstack.save(tiny(), tmp_path / "ck")
    rewrite(tmp_path / "ck", lambda t: t.__setitem__("output.weight", torch.zeros(256, 64)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*output.weight"):
        flatstack.load(tmp_path / "ck")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MixtralForCausalLM"):
        flatstack.load(tmp_path)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        flatstack.load(tmp_path / "nowhere")
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="missing file .*config.json"):
        flatstack.load(tmp_path / "ck")
    flatstack.save(tiny(), tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        flatstack.load(tmp_path / "bad")


def test_token_outside_vocabulary_named():
    model = tiny()
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary of size 256"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none.npz"), str(tmp_path / "out"), "--from", "xai-grok1"]) == 1
    err = capsys.readouterr().err
    assert "none.npz" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["info", "no-such-model"]) == 1
    assert "grok-1" in capsys.readouterr().err


def test_info_grok1_on_meta_device():
    out = subprocess.run([sys.executable, "-m", "flatstack.cli", "info", "grok-1", "--json"],
                         check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    assert round(report["total_params"] / 1e9, 1) == 315.7
    assert round(report["active_params_per_token"] / 1e9, 1) == 83.8
    assert report["weight_bytes"]["bfloat16"] == 2 * report["total_params"]


def test_info_reads_checkpoint_config(tmp_path, capsys):
    model = tiny()
    flatstack.save(model, tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())


def test_read_safetensors_missing_shard(tmp_path):
    flatstack.save(tiny(), tmp_path / "ck", max_shard_bytes=200_000)
    next((tmp_path / "ck").glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="shard .*model-00002.* missing"):
        read_safetensors(tmp_path / "ck")
