"""Writes the GGUF fuzz seeds under tests/fuzz/corpus/ with the gguf package's
writer (an independent GGUF producer): every metadata value type, and tensors
of every type kvq dequantizes. Run: python tests/fuzz/make_seeds.py"""
import pathlib

import numpy as np
import gguf

CORPUS = pathlib.Path(__file__).parent / "corpus"
RNG = np.random.default_rng(0)


def random_blocks(qtype, n_elements):
    """Random block bytes with finite fp16 scales (ggml's layouts)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, size=(n_elements // block_elems, block_bytes), dtype=np.uint8)
    scales = RNG.uniform(-2, 2, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    offset = 208 if qtype == gguf.GGMLQuantizationType.Q6_K else 0
    raw[:, offset:offset + 2] = scales
    return raw


def write(name, build):
    w = gguf.GGUFWriter(str(CORPUS / name), "llama")
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_types(w):
    w.add_uint8("u8", 7)
    w.add_int8("i8", -7)
    w.add_uint16("u16", 700)
    w.add_int16("i16", -700)
    w.add_uint32("u32", 70000)
    w.add_int32("i32", -70000)
    w.add_float32("f32", 1.5)
    w.add_bool("flag", True)
    w.add_string("s", "héllo")
    w.add_uint64("u64", 1 << 40)
    w.add_int64("i64", -(1 << 40))
    w.add_float64("f64", 0.25)
    w.add_array("words", ["a", "bc", ""])
    w.add_array("ints", [1, 2, 3])
    w.add_tensor("f32", RNG.standard_normal((2, 32)).astype(np.float32))
    w.add_tensor("f16", RNG.standard_normal((2, 32)).astype(np.float16))
    for qtype in ("Q4_0", "Q4_1", "Q8_0", "Q6_K", "BF16"):
        t = gguf.GGMLQuantizationType[qtype]
        n = 256
        raw = random_blocks(t, n) if qtype != "BF16" else RNG.integers(0, 1 << 16, n, dtype=np.uint16).view(np.uint8)
        w.add_tensor(qtype.lower(), raw.reshape(1, -1), raw_dtype=t)


def tiny_llama(w):
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", RNG.standard_normal((3, 32)).astype(np.float32))


if __name__ == "__main__":
    CORPUS.mkdir(exist_ok=True)
    write("seed-all-types.gguf", all_types)
    write("seed-tiny-llama.gguf", tiny_llama)
