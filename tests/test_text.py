"""Caption encoders (`pipeline.text_encoders`) and text columns (`pipeline.text`), against
transformers' own outputs: tiny randomly initialised CLIP and T5 text models with tokenizers built
here with the tokenizers library, saved in temporary folders (nothing comes from a model hub).

The builders are shared with `test_text_pipeline.py`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ConfigError, TextEncoderConfig, config_from_dict
from pipeline.schema import to_storage
from pipeline.text import TextLayout, TextStats, read_npz_text, read_parquet_text, text_item

WORDS = ("a photo of the cat dog red blue green tabby rocket moon coffee cup coins grass astronaut chelsea "
         "hubble_deep_field immunohistochemistry motorcycle_left colorwheel").split()
CLIP_POSITIONS = 16
CAPTIONS = ["a photo of a cat", "", None, "a RED rocket on the moon", " ".join(["tabby"] * 40), "unknown words here"]


def _vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab["<bos>"] = len(vocab)
    vocab["<eos>"] = len(vocab)  # the highest id, as CLIP's end token is
    return vocab


def make_tokenizer(folder: Path, *, clip: bool) -> None:
    """A word-level tokenizer (lowercased, split on whitespace and punctuation), saved as a
    transformers fast tokenizer: CLIP-style <bos> ... <eos> padded with <eos>, or T5-style
    ... </s> padded with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if clip:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                       unk_token="<unk>", model_max_length=CLIP_POSITIONS)
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def make_clip(folder: Path, *, projection: bool, seed: int = 0) -> None:
    """A 2-layer CLIP text model of hidden size 32 (with a 24-wide projection when asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=CLIP_POSITIONS, projection_dim=24,
                            bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<eos>"])
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    cls(config).save_pretrained(str(folder))


def make_t5(folder: Path, *, seed: int = 0) -> None:
    """A 2-layer T5 encoder of hidden size 32."""
    from transformers import T5Config, T5EncoderModel

    vocab = _vocab()
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=vocab["<eos>"], decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(folder))


def make_models(root: Path) -> dict[str, Path]:
    """A diffusers-style folder (text_encoder/ + tokenizer/: CLIPTextModel; text_encoder_2/ +
    tokenizer_2/: CLIPTextModelWithProjection) and a transformers folder holding a T5 encoder and
    its tokenizer."""
    sd = root / "sd"
    make_clip(sd / "text_encoder", projection=False, seed=1)
    make_tokenizer(sd / "tokenizer", clip=True)
    make_clip(sd / "text_encoder_2", projection=True, seed=2)
    make_tokenizer(sd / "tokenizer_2", clip=True)
    t5 = root / "t5"
    make_t5(t5, seed=3)
    make_tokenizer(t5, clip=False)
    return {"sd": sd, "t5": t5}


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("text-models"))


def encoder_config(**kw) -> TextEncoderConfig:
    """A validated text encoder config (through the job config's validation)."""
    raw = {"input": {"urls": "x.tar"}, "output": {"path": "out"}, "text": [kw]}
    return config_from_dict(raw).text[0]


def _encoders(*configs: TextEncoderConfig):
    from pipeline.text_encoders import TextEncoders

    return TextEncoders(list(configs), torch.device("cpu"))


def _texts(captions):
    return ["" if c is None else c for c in captions]


# ------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("change, key, message", [
    ({"name": "T5"}, "text[0].name", "lowercase letters"),
    ({"kind": "t5x"}, "text[0].kind", "expected clip, t5 or a transformers model class name"),
    ({"outputs": ["pooled"]}, "text[0].outputs", "no pooled or projected output"),
    ({"outputs": []}, "text[0].outputs", "list at least one"),
    ({"outputs": ["last", "last"]}, "text[0].outputs", "duplicate"),
    ({"outputs": ["hidden"]}, "text[0].outputs[0]", "expected one of last|penultimate|pooled|projected"),
    ({"max_length": 0}, "text[0].max_length", "must be >= 1"),
    ({"storage_dtype": "fp64"}, "text[0].storage_dtype", "expected one of fp32|fp16|bf16"),
    ({"tokenizr": "x"}, "text[0].tokenizr", "did you mean 'tokenizer'"),
])
def test_config_errors_name_the_key(change, key, message):
    raw = {"name": "t5", "kind": "t5", "path": "m", "max_length": 8, "outputs": ["last"], **change}
    with pytest.raises(ConfigError) as e:
        encoder_config(**raw)
    assert e.value.key == key and message in str(e.value)


def test_config_defaults_and_redaction():
    c = config_from_dict({
        "input": {"urls": "x.tar"}, "output": {"path": "out"},
        "text": [{"name": "clip_l", "kind": "clip", "path": "s3://user:pw@b/sd/text_encoder", "max_length": 77,
                  "outputs": ["penultimate"], "storage_options": {"secret": "s3cr3t"}},
                 {"name": "t5", "kind": "t5", "path": "t5", "max_length": 512, "outputs": ["last"]}],
    })
    assert [(t.padding, t.dtype, t.storage_dtype) for t in c.text] == [("max_length", "fp32", "fp16"),
                                                                       ("none", "fp32", "fp16")]
    d = c.to_dict()
    assert "s3cr3t" not in str(d) and "pw@" not in str(d) and d["text"][1]["path"] == "t5"
    with pytest.raises(ConfigError, match="text: expected a list"):
        config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "out"}, "text": {"name": "t5"}})
    with pytest.raises(ConfigError, match="text\\[1\\].name: 't5' is used by another"):
        config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "out"},
                          "text": [{"name": "t5", "kind": "t5", "path": "a", "max_length": 8, "outputs": ["last"]}] * 2})
    assert config_from_dict({"input": {"urls": "x.tar"}, "output": {"path": "out"}}).text == []


# ------------------------------------------------------------------------------------------------
# folders


def test_folders_resolve_diffusers_and_transformers_layouts(text_models, tmp_path):
    from pipeline.text_encoders import TextEncoderError, resolve_folders

    sd, t5 = str(text_models["sd"]), str(text_models["t5"])

    def resolve(**kw):
        return resolve_folders(encoder_config(name="e", kind="clip", max_length=8, outputs=["last"], **kw), "text[0]")

    assert resolve(path=sd) == (f"{sd}/text_encoder", f"{sd}/tokenizer")
    assert resolve(path=f"{sd}/text_encoder_2") == (f"{sd}/text_encoder_2", f"{sd}/tokenizer_2")
    assert resolve(path=t5) == (t5, t5)
    assert resolve(path=f"{sd}/text_encoder", tokenizer=t5) == (f"{sd}/text_encoder", t5)
    with pytest.raises(TextEncoderError) as e:
        resolve(path=str(tmp_path))
    assert e.value.key == "text[0].path" and "no config.json" in str(e.value)
    with pytest.raises(TextEncoderError) as e:
        resolve(path=f"{sd}/text_encoder", tokenizer=str(tmp_path))
    assert e.value.key == "text[0].tokenizer"


# ------------------------------------------------------------------------------------------------
# outputs against transformers


def test_clip_outputs_equal_transformers_fp32(text_models):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    sd = text_models["sd"]
    clip_l = encoder_config(name="clip_l", kind="clip", path=str(sd), max_length=CLIP_POSITIONS,
                            outputs=["last", "penultimate", "pooled"], storage_dtype="fp32")
    clip_g = encoder_config(name="clip_g", kind="clip", path=str(sd / "text_encoder_2"), max_length=CLIP_POSITIONS,
                            outputs=["penultimate", "projected"], storage_dtype="fp32")
    encoders = _encoders(clip_l, clip_g)
    rows = encoders.launch(CAPTIONS).get()

    texts = _texts(CAPTIONS)
    for folder, tok_folder, cls in ((sd / "text_encoder", sd / "tokenizer", CLIPTextModel),
                                    (sd / "text_encoder_2", sd / "tokenizer_2", CLIPTextModelWithProjection)):
        tok = AutoTokenizer.from_pretrained(str(tok_folder))
        enc = tok(texts, padding="max_length", max_length=CLIP_POSITIONS, truncation=True, return_tensors="pt")
        model = cls.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            ref = model(input_ids=enc["input_ids"], output_hidden_states=True)
        name = "clip_l" if cls is CLIPTextModel else "clip_g"
        for i, row in enumerate(rows):
            assert row[f"{name}_length"] == int(enc["attention_mask"][i].sum())
            assert np.array_equal(row[f"{name}_penultimate"], ref.hidden_states[-2][i].numpy())
            if name == "clip_l":
                assert np.array_equal(row["clip_l_last"], ref.last_hidden_state[i].numpy())
                assert np.array_equal(row["clip_l_pooled"], ref.pooler_output[i].numpy())
            else:
                assert np.array_equal(row["clip_g_projected"], ref.text_embeds[i].numpy())
    # "" and a missing caption are the same: the begin and end tokens; 40 words are cut to max_length.
    assert rows[1]["clip_l_length"] == rows[2]["clip_l_length"] == 2
    assert np.array_equal(rows[1]["clip_l_penultimate"], rows[2]["clip_l_penultimate"])
    assert rows[4]["clip_l_length"] == CLIP_POSITIONS
    assert {c.name: c.shape for c in encoders.encoders[1].columns} == {"clip_g_penultimate": (CLIP_POSITIONS, 32),
                                                                      "clip_g_projected": (24,)}


def test_t5_stores_real_tokens_only_equal_to_transformers(text_models):
    from transformers import AutoTokenizer, T5EncoderModel

    t5 = text_models["t5"]
    cfg = encoder_config(name="t5", kind="t5", path=str(t5), max_length=12, outputs=["last", "penultimate"],
                         storage_dtype="fp32")
    encoder = _encoders(cfg)
    rows = encoder.launch(CAPTIONS).get()
    (column,) = [c for c in encoder.encoders[0].columns if c.output == "last"]
    assert column.variable and column.shape == (12, 32)

    tok = AutoTokenizer.from_pretrained(str(t5))
    model = T5EncoderModel.from_pretrained(str(t5)).eval()
    texts = _texts(CAPTIONS)
    enc = tok(texts, padding="longest", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    for i, row in enumerate(rows):
        n = int(enc["attention_mask"][i].sum())
        assert row["t5_length"] == n and row["t5_last"].shape == (n, 32)
        # exactly what transformers computes for the batch, padding dropped
        assert np.array_equal(row["t5_last"], ref.last_hidden_state[i, :n].numpy())
        assert np.array_equal(row["t5_penultimate"], ref.hidden_states[-2][i, :n].numpy())
        # and, up to float rounding, what each caption gives alone: the padding does not leak in
        alone = tok([texts[i]], max_length=12, truncation=True, return_tensors="pt")
        with torch.no_grad():
            single = model(input_ids=alone["input_ids"]).last_hidden_state[0].numpy()
        np.testing.assert_allclose(row["t5_last"], single, rtol=1e-5, atol=1e-5)
    # the empty and the missing caption are the end token alone; the long one is truncated as the tokenizer does
    assert rows[1]["t5_length"] == rows[2]["t5_length"] == 1
    assert rows[4]["t5_length"] == 12 and tok(texts[4], max_length=12, truncation=True)["input_ids"][-1] == \
        _vocab()["<eos>"]


def test_reduced_precision_compute_matches_transformers(text_models):
    from transformers import AutoTokenizer, T5EncoderModel

    t5 = text_models["t5"]
    cfg = encoder_config(name="t5", kind="t5", path=str(t5), max_length=12, outputs=["last"], dtype="bf16",
                         storage_dtype="bf16")
    rows = _encoders(cfg).launch(CAPTIONS[:2]).get()
    tok = AutoTokenizer.from_pretrained(str(t5))
    model = T5EncoderModel.from_pretrained(str(t5), dtype=torch.bfloat16).eval()
    enc = tok(_texts(CAPTIONS[:2]), padding="longest", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state.float()
    for i, row in enumerate(rows):
        n = row["t5_length"]
        assert np.array_equal(row["t5_last"], ref[i, :n].numpy())
        # bf16 storage of a bf16 computation loses nothing more
        assert np.array_equal(to_storage(row["t5_last"], "bf16"), to_storage(ref[i, :n].numpy(), "bf16"))


def test_load_errors_name_the_key(text_models):
    from pipeline.text_encoders import TextEncoderError

    sd = text_models["sd"]
    with pytest.raises(TextEncoderError) as e:  # a CLIPTextModel checkpoint has no projection weights
        _encoders(encoder_config(name="c", kind="clip", path=str(sd / "text_encoder"), max_length=8,
                                 outputs=["projected"]))
    assert e.value.key == "text[0].path" and "lack" in str(e.value)
    with pytest.raises(TextEncoderError) as e:
        _encoders(encoder_config(name="c", kind="NoSuchModel", path=str(sd / "text_encoder"), max_length=8,
                                 outputs=["last"]))
    assert e.value.key == "text[0].kind"
    with pytest.raises(TextEncoderError) as e:
        _encoders(encoder_config(name="c", kind="clip", path=str(sd), max_length=CLIP_POSITIONS + 1,
                                 outputs=["last"]))
    assert e.value.key == "text[0].max_length"


def test_facts_fingerprint_weights_and_tokenizer(text_models, tmp_path):
    import shutil

    t5 = text_models["t5"]
    cfg = encoder_config(name="t5", kind="t5", path=str(t5), max_length=12, outputs=["last"])
    facts = _encoders(cfg).facts()["t5"]
    assert facts["model"]["class"] == "T5EncoderModel" and facts["shapes"] == {"last": [12, 32]}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(facts["model"]["tokenizer_files"])
    assert "model.safetensors" not in facts["model"]["tokenizer_files"]
    copy = tmp_path / "t5"
    shutil.copytree(t5, copy)
    make_t5(copy, seed=99)
    other = _encoders(encoder_config(name="t5", kind="t5", path=str(copy), max_length=12, outputs=["last"]))
    changed = other.facts()["t5"]["model"]
    assert changed["weights_sha256"] != facts["model"]["weights_sha256"]
    assert changed["tokenizer_files"] == facts["model"]["tokenizer_files"]


# ------------------------------------------------------------------------------------------------
# columns: layout, stored forms, reading back


def _layout(padding: str = "none", dtype: str = "fp16") -> TextLayout:
    entry = {"kind": "t5", "max_length": 6, "padding": padding, "outputs": ["last", "pooled"],
             "storage_dtype": dtype, "shapes": {"last": [6, 4], "pooled": [3]}}
    return TextLayout.from_manifest({"enc": entry})


def _row(n: int, seed: int) -> dict:
    g = np.random.default_rng(seed)
    return {"enc_last": g.standard_normal((n, 4)).astype(np.float32),
            "enc_pooled": g.standard_normal(3).astype(np.float32), "enc_length": n}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_parquet_columns_round_trip_unpadded(dtype):
    layout = _layout(dtype=dtype)
    rows = [_row(n, i) for i, n in enumerate([1, 6, 3])]
    assert layout.names == ["enc_last", "enc_pooled", "enc_length"]
    assert layout.check(rows[0]) is None
    assert "shape" in layout.check({**rows[0], "enc_last": np.zeros((2, 4), np.float32)})
    assert "0..6" in layout.check({**rows[0], "enc_length": 7})
    arrays = layout.arrow_arrays(rows)
    table = pa.Table.from_arrays([arrays[f.name] for f in layout.fields()], schema=pa.schema(layout.fields()))
    assert table.schema.field("enc_last").type == pa.list_({"fp32": pa.float32(), "fp16": pa.float16(),
                                                          "bf16": pa.uint16()}[dtype])
    assert json.loads(table.schema.field("enc_last").metadata[b"shape"]) == [None, 4]
    back = read_parquet_text(table.slice(1))  # a slice: offsets do not start at 0
    assert back["enc_length"] == [6, 3]
    for i, row in enumerate(rows[1:]):
        from pipeline.schema import from_storage

        for col in ("enc_last", "enc_pooled"):
            assert np.array_equal(back[col][i], from_storage(to_storage(row[col], dtype), dtype))
    assert layout.stored_bytes(rows[1]) == (6 * 4 + 3) * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype] + 4


def test_fixed_layout_and_npz_member():
    layout = _layout(padding="max_length", dtype="bf16")
    row = _row(6, 0)
    row["enc_length"] = 2  # fixed: every position is stored, the length says where padding starts
    assert layout.check(row) is None
    member = layout.npz_member(row)
    assert member == layout.npz_member(row)  # reproducible bytes
    back = read_npz_text(member, layout.dtypes())
    assert back["enc_length"] == 2 and back["enc_last"].shape == (6, 4)
    assert np.array_equal(back["enc_last"], to_storage(row["enc_last"], "bf16").astype(np.uint32).__lshift__(16)
                          .view(np.float32))
    with np.load(io.BytesIO(member)) as npz:  # readable as a plain .npz (webdataset decodes it so)
        assert npz["enc_last"].dtype == np.uint16 and int(npz["enc_length"]) == 2


def test_text_item_pads_back_with_a_mask():
    layout = _layout()
    row = _row(3, 1)
    plain = text_item(row, layout, pad=False)
    assert plain["enc_last"].shape == (3, 4) and int(plain["enc_length"]) == 3 and "enc_mask" not in plain
    padded = text_item(row, layout, pad=True)
    assert padded["enc_last"].shape == (6, 4) and padded["enc_mask"].tolist() == [True] * 3 + [False] * 3
    assert torch.equal(padded["enc_last"][:3], plain["enc_last"]) and not padded["enc_last"][3:].any()
    assert padded["enc_pooled"].shape == (3,)


def test_text_stats_merge():
    layout = _layout()
    rows = [_row(n, i) for i, n in enumerate([1, 6, 3])]
    rows[2]["enc_pooled"][0] = np.nan
    whole = TextStats(layout).update_all(rows).to_dict()
    merged = TextStats(layout).update_all(rows[:1]).merge(TextStats(layout).update_all(rows[1:])).to_dict()
    assert whole["tokens"] == merged["tokens"]
    for name, col in whole["columns"].items():
        assert col == pytest.approx(merged["columns"][name])
    last = whole["columns"]["enc_last"]
    values = np.concatenate([r["enc_last"].ravel() for r in rows])
    assert last["count"] == values.size and last["mean"] == pytest.approx(values.mean())
    assert last["std"] == pytest.approx(values.std()) and last["max"] == pytest.approx(values.max())
    assert whole["columns"]["enc_pooled"]["nan"] == 1
    assert whole["tokens"]["enc"] == {"rows": 3, "mean": pytest.approx(10 / 3), "min": 1, "max": 6,
                                      "max_length": 6, "at_max_length": 1}
