"""The released LVM end to end, as the README's "Use the released LVM" says: `import-vqgan` (open-muse and diffusers
layouts), `import-hf` (sharded bf16 safetensors and `.bin`), then `prompt`, as subprocesses; the generated ids must
equal a reference computed with the original code paths (open-muse encode of [0, 1] pixels -> ids without BOS ->
transformers' greedy `generate` with the specials suppressed -> open-muse decode), the PNGs within 1/255."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from released_lvm import (
    CODES,
    TOKENS_PER_IMAGE,
    llama,
    muse_model,
    save_llama_bin,
    save_llama_safetensors,
    save_muse,
    to_vqmodel,
)

from lvm_pl.console import UserError
from lvm_pl.images import to_tensor, to_uint8
from lvm_pl.interop.vqgan_import import import_vqgan
from lvm_pl.vqgan import load_tokenizer
from main import main

BLOCK = 4 * TOKENS_PER_IMAGE  # 3 prompt frames + the generated one (its last token never fed)
NUM_FRAMES = 2

# load_tokenizer outside LightningCLI: save_hyperparameters sees the built parts
pytestmark = pytest.mark.filterwarnings("ignore:Attribute '.*' is an instance of `nn.Module`")


def run(repo_root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=repo_root, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files (tokenizer both ways, LLaMA both ways), prompt images, and the reference output."""
    root = tmp_path_factory.mktemp("released")
    muse = muse_model()
    save_muse(muse, root / "muse")
    to_vqmodel(muse).to(torch.float16).save_pretrained(root / "amused")  # fp16 safetensors, as amused ships
    lm = llama(BLOCK)
    save_llama_safetensors(lm, root / "hf_safetensors")
    save_llama_bin(lm, root / "hf_bin")
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    paths = []
    for i, p in enumerate(pixels):
        paths.append(str(root / f"frame{i}.png"))
        Image.fromarray(p).save(paths[-1])
    # the reference, as the official demo runs it: 4 frames, a context of 3 (the oldest dropped)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        ids = muse.get_code(x)  # [4, 16]
        assert ids.unique().numel() > 8  # many codes: a mix-up of names or ranges would change them
        from transformers import LlamaForCausalLM

        ref = LlamaForCausalLM.from_pretrained(root / "hf_safetensors", dtype=torch.float32).eval()
        context, frames = ids[-3:].reshape(1, -1), []
        for _ in range(NUM_FRAMES):
            out = ref.generate(
                context,
                attention_mask=torch.ones_like(context),
                max_new_tokens=TOKENS_PER_IMAGE,
                do_sample=False,
                suppress_tokens=list(range(CODES, ref.config.vocab_size)),
                pad_token_id=CODES,
            )
            frames.append(out[0, -TOKENS_PER_IMAGE:])
            context = out[:, -3 * TOKENS_PER_IMAGE :]
        generated = torch.stack(frames)  # [F, 16]
        decoded = (muse.decode_code(generated).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return {"root": root, "images": paths, "prompt_ids": ids, "tokens": generated.tolist(), "decoded": decoded}


@pytest.mark.slow
def test_import_hf_reads_both_release_forms_alike(released, repo_root):
    root = released["root"]
    done = run(
        repo_root, "import-hf", "--hf_dir", str(root / "hf_bin"), "--out", str(root / "lvm_bin.ckpt"),
        "--codebook_size", str(CODES), "--tokens_per_image", str(TOKENS_PER_IMAGE),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "torch.bfloat16" in done.stderr and "BOS no" in done.stderr
    # the same command line in this process (a subprocess each costs seconds of imports)
    main(
        ["import-hf", "--hf_dir", str(root / "hf_safetensors"), "--out", str(root / "lvm_safetensors.ckpt"),
         "--codebook_size", str(CODES), "--tokens_per_image", str(TOKENS_PER_IMAGE)]
    )  # fmt: skip
    a, b = (torch.load(root / f"lvm_{f}.ckpt", weights_only=True) for f in ("safetensors", "bin"))
    assert a["hyper_parameters"]["layout"] == b["hyper_parameters"]["layout"]
    layout = a["hyper_parameters"]["layout"]
    assert (layout["add_bos"], layout["add_eos"], layout["vocab_size"], layout["codebook_size"]) == (
        False, False, CODES + 100, CODES,
    )  # fmt: skip
    assert a["hyper_parameters"]["overrides"]["rope_base"] == 10000.0  # no rope_theta: LLaMA's default
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert v.dtype == torch.bfloat16, k  # the checkpoint's dtype is kept
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.slow
def test_prompt_matches_the_reference(released, repo_root):
    root = released["root"]
    if not (root / "lvm_bin.ckpt").exists():
        done = run(
            repo_root, "import-hf", "--hf_dir", str(root / "hf_bin"), "--out", str(root / "lvm_bin.ckpt"),
            "--codebook_size", str(CODES), "--tokens_per_image", str(TOKENS_PER_IMAGE),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    done = run(repo_root, "import-vqgan", "--source_dir", str(root / "muse"), "--out", str(root / "muse.ckpt"))
    assert done.returncode == 0, done.stderr
    assert "open-muse VQGANModel" in done.stderr and "pixels in [0.0, 1.0]" in done.stderr
    out = root / "out"
    done = run(
        repo_root, "prompt", "--lvm", str(root / "lvm_bin.ckpt"), "--tokenizer", str(root / "muse.ckpt"),
        "--images", *released["images"], "--out", str(out), "--num_frames", str(NUM_FRAMES),
        "--generation.temperature", "0", "--generation.top_k", "null",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the earliest 1 dropped" in done.stderr  # 4 images, a context of 3
    assert json.loads((out / "prompt" / "tokens.json").read_text())["tokens"] == [released["tokens"]]
    for f in range(NUM_FRAMES):
        png = np.asarray(Image.open(out / "prompt" / f"c0_f{f}.png"), dtype=np.int16)
        assert np.abs(png - released["decoded"][f]).max() <= 1, f
    grid = Image.open(out / "prompt.png")
    assert grid.height > 16 + 2 * 2  # a header band above the row of cells


def test_the_diffusers_export_imports_to_the_same_tokenizer(released):
    """amused's VQModel layout (fp16 safetensors) gives the same ids and decodes as open-muse's; after the import the
    prompt path is the one above, so the tokenizer is checked here directly."""
    root = released["root"]
    main(["import-vqgan", "--source_dir", str(root / "amused"), "--out", str(root / "amused.ckpt")])
    vq = load_tokenizer(root / "amused.ckpt")
    assert vq.input_range == (0.0, 1.0)  # the released range, with no lvm_input_range in its config.json
    images = torch.stack([to_tensor(np.asarray(Image.open(p))) for p in released["images"]])  # [-1, 1]
    assert torch.equal(vq.encode(images).flatten(1), released["prompt_ids"])
    decoded = to_uint8(vq.decode(torch.tensor(released["tokens"]).view(-1, 4, 4))).astype(np.int16)
    assert np.abs(decoded - released["decoded"]).max() <= 1


def test_prompt_names_an_unreadable_image(released, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_:
        main(["prompt", "--lvm", "x.ckpt", "--tokenizer", "y.ckpt", "--images", released["images"][0], str(bad)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: images: cannot read {bad}")


def test_import_vqgan_refuses_what_does_not_fit(released, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="neither an open-muse VQGANModel nor a diffusers VQModel"):
        import_vqgan(str(tmp_path / "other"), str(tmp_path / "x.ckpt"))
    muse = released["root"] / "muse"
    cases = [
        ({"num_embeddings": 128}, "weights do not match its config.json.*128"),  # codebook
        ({"hidden_channels": 64}, "weights do not match its config.json.*64"),  # channels
        ({"decoder_res_blocks": 3}, "decoder_res_blocks=3 is not supported"),
    ]
    for i, (change, named) in enumerate(cases):
        wrong = tmp_path / f"wrong{i}"
        wrong.mkdir()
        (wrong / "pytorch_model.bin").write_bytes((muse / "pytorch_model.bin").read_bytes())
        (wrong / "config.json").write_text(json.dumps(json.loads((muse / "config.json").read_text()) | change))
        with pytest.raises(UserError, match=named) as err:
            import_vqgan(str(wrong), str(tmp_path / "x.ckpt"))
        assert "\n" not in str(err.value) and not (tmp_path / "x.ckpt").exists()
