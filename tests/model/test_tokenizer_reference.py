"""kvq's tokenizer against llama.cpp's (llama-cpp-python) on the same GGUF: the
evaluation split, hard strings and seeded random strings must tokenize id for id
the same, every token must print the same bytes, decode(encode(x)) == x for
valid UTF-8, and the chat prompt must equal the GGUF's Jinja template rendered
by jinja2. The "gpt-2" and "default" pre-tokenizers are checked the same way on
copies of the GGUF whose tokenizer.ggml.pre is changed.

Needs llama-cpp-python (run with ~/.cache/kvq/venv/bin/python -m pytest) and
`kvq-testtool tokenize -m MODEL --requests F --out F` in the build directory,
which answers each line of the requests file with one line of the output:
    encode <parse_special 0|1> <hex text>  ->  "<ids, space-separated>\\t<hex of decode(ids)>"
    decode <id> <id> ...                    ->  "<hex of decode(ids)>"
    chat <hex user message>                 ->  "<hex of apply_chat_template(message)>"
The evaluation text is data/evaluation.txt (KVQ_EVAL_TEXT overrides).
"""

import os
import random
import subprocess
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference (use ~/.cache/kvq/venv)")

# (text, why it is hard). Each runs with parse_special on and off.
HARD_STRINGS = [
    (b"", "empty"),
    (b"Hello world", "plain"),
    (b"12345 3.14159 1,000,000 2024-05-01", "digits are split one by one"),
    ("٠١٢٣٤ ۴۵۶ १२३ ௧௨ ²³ Ⅻ ½".encode(), "non-ASCII numbers (Nd, No, Nl)"),
    ("中文字符，日本語のテキスト。한국어 텍스트".encode(), "CJK, kana, Hangul, fullwidth punctuation"),
    ("café naïve Ærøskøbing Straße ΑΒΓ δ Ёжик".encode(), "accented Latin, Greek, Cyrillic"),
    ("e\u0301 a\u0308\u0323 देवनागरी हिन्दी".encode(), "combining marks, Devanagari"),
    ("مرحبا بالعالم שלום".encode(), "right-to-left scripts"),
    (b"a  b   c    d", "space runs between words"),
    (b"tab\there\t\tand\t\t\t", "tabs"),
    (b"\n\n\n", "newlines only"),
    (b" \n ", "space newline space"),
    (b"line\r\nwindows\r\n\r\nend", "CRLF"),
    (b"   leading and trailing   ", "edge whitespace"),
    ("nbsp\u00a0here\u3000ideographic\u2028line\u0085next".encode(), "non-ASCII whitespace"),
    ("\U0001F468\u200D\U0001F469\u200D\U0001F467 \U0001F3F3\uFE0F\u200D\U0001F308 \U0001F44D\U0001F3FD".encode(),
     "emoji, ZWJ sequences, skin tones"),
    (b"'s 't 're 've 'm 'll 'd 'S 'LL 'Re it's we'LL o'clock '", "contractions, upper case too"),
    (b"$100 + 5% <tag> a=b^c~d|e `code` __init__ #!/bin/sh", "symbols and punctuation"),
    (b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "ChatML special tokens"),
    (b"<|im_start|><|im_start|>x<|im_end|><|endoftext|>", "adjacent special tokens"),
    (b"<|im_start|", "truncated special token"),
    (b"<filename>a.py<file_sep><jupyter_code>", "other control tokens"),
    (b"\x00\x01\x04\x06\x1b\x1d\x7f", "control bytes (some have no byte token)"),
    (b"\xff\xfe", "invalid UTF-8: bytes never valid"),
    (b"\x80\xbf abc \x80", "invalid UTF-8: lone continuation bytes"),
    (b"x\xe2\x82 \xf0\x9f\x98 \xc3", "invalid UTF-8: truncated sequences"),
    (b"\xc1\x81\xe0\x80\x80 \xed\xa0\x80", "overlong forms and a surrogate, which llama.cpp accepts"),
    ("\uFFFD\uE000\U000F0000\u0378".encode(), "replacement character, private use, unassigned"),
    (b"a" * 3000, "one long word"),
    (b" " * 300 + b"x", "one long space run"),
]


def is_valid_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="session")
def testtool(build_dir):
    path = build_dir / "kvq-testtool"
    if not path.is_file():
        pytest.skip(f"{path} not built (set KVQ_BUILD_DIR or build the project)")
    return path


class Ours:
    """Batches requests to one `kvq-testtool tokenize` run."""

    def __init__(self, testtool, model, tmp_path):
        self.testtool, self.model, self.tmp_path = testtool, model, tmp_path

    def run(self, requests):
        request_file = self.tmp_path / "requests.txt"
        answer_file = self.tmp_path / "answers.txt"
        request_file.write_text("".join(r + "\n" for r in requests))
        result = subprocess.run([str(self.testtool), "tokenize", "-m", str(self.model), "--requests", str(request_file),
                                 "--out", str(answer_file)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        print(result.stderr.strip())
        answers = answer_file.read_text().split("\n")[:-1]
        assert len(answers) == len(requests)
        return answers

    def encode(self, cases):
        """[(ids, decoded bytes)] for [(text bytes, parse_special)]."""
        answers = self.run([f"encode {int(special)} {text.hex()}" for text, special in cases])
        out = []
        for answer in answers:
            ids, decoded = answer.split("\t")
            out.append(([int(i) for i in ids.split()], bytes.fromhex(decoded)))
        return out

    def token_texts(self, n_vocab):
        return [bytes.fromhex(a) for a in self.run([f"decode {i}" for i in range(n_vocab)])]

    def chat(self, message):
        return bytes.fromhex(self.run([f"chat {message.encode().hex()}"])[0]).decode()


def reference(model):
    return llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)


def reference_ids(llm, text, special):
    return llm.tokenize(text, add_bos=False, special=special)


def reference_token_text(llm, token):
    # Llama.detokenize reads pieces through a 32-byte buffer and drops longer
    # ones (long whitespace tokens), so ask llama.cpp directly.
    size = 256
    buffer = (llama_cpp.ctypes.c_char * size)()
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buffer, size, 0, False)
    assert 0 <= n <= size
    return bytes(buffer[:n])


def assert_same_ids(ours, ref, text, what):
    if ours == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    pytest.fail(f"{what}: ids differ at {i} (ours {len(ours)} ids, llama.cpp {len(ref)}): "
                f"ours {ours[max(0, i - 5):i + 5]}, llama.cpp {ref[max(0, i - 5):i + 5]}, text {text[:80]!r}")


def random_strings(seed, count):
    """Strings mixing every character class the pre-tokenizers distinguish,
    with the characters their rules look at next to each other."""
    pieces = ["a", "Z", "é", "ß", "Ж", "中", "の", "ह", "\u0301", "0", "7", "٣", "²", "Ⅻ", "½", " ", "  ", "\t",
              "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0085", "\x0b", "'", "'s", "'t", "'re", "'ve", "'m",
              "'ll", "'d", "'S", "'LL", ".", ",", "!", "?", "-", "_", "$", "+", "<", "=", ">", "^", "~", "|", "`",
              "@", "#", "%", "&", "*", "(", ")", "[", "]", "{", "}", "\"", "/", "\\", "…", "—", "¿", "€", "©",
              "\U0001F600", "\u200d", "\ufe0f", "\ufffd", "\x01", "\x1d", "<|im_start|>", "<|im_end|>", "the",
              " the", "ing", "123", "4567"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 24))).encode() for _ in range(count)]


@pytest.fixture(scope="session")
def eval_text_path(repo_root):
    return Path(os.environ.get("KVQ_EVAL_TEXT", repo_root / "data" / "evaluation.txt"))


@pytest.fixture(scope="module")
def smollm(testtool, model_path, tmp_path_factory):
    return Ours(testtool, model_path, tmp_path_factory.mktemp("tokenizer")), reference(model_path)


def write_pre_variant(source, destination, pre):
    """A tensor-less copy of source's metadata with tokenizer.ggml.pre = pre."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(destination), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # header fields; the writer adds the architecture itself
        value = pre if key == "tokenizer.ggml.pre" else field.contents()
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("special", [False, True])
def test_hard_strings(smollm, special):
    ours, llm = smollm
    cases = [(text, special) for text, _ in HARD_STRINGS]
    for (text, why), (ids, _) in zip(HARD_STRINGS, ours.encode(cases)):
        assert_same_ids(ids, reference_ids(llm, text, special), text, why)


def test_special_tokens_only_parsed_when_asked(smollm):
    ours, _ = smollm
    (plain, _), (parsed, _) = ours.encode([(b"<|im_start|>", False), (b"<|im_start|>", True)])
    assert parsed == [1] and len(plain) > 1


def test_round_trip(smollm):
    """decode(encode(x)) == x for valid UTF-8 whose bytes all have byte tokens
    (SmolLM2 lacks tokens for 0x04, 0x06, 0x13, 0x14, 0x16 and 0x1D: llama.cpp
    drops those bytes, and so do we)."""
    ours, _ = smollm
    missing = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D}
    texts = [t for t, _ in HARD_STRINGS if is_valid_utf8(t) and not missing & set(t)]
    for text, (_, decoded) in zip(texts, ours.encode([(t, False) for t in texts])):
        assert decoded == text


def test_invalid_utf8_becomes_replacement_characters(smollm):
    """Each bad byte is one U+FFFD; lead bytes F4..F7 beyond U+10FFFF are bad
    bytes too (llama.cpp aborts the process on those, so compare with U+FFFDs)."""
    ours, llm = smollm
    cases = [(b"\xf5\x80\x80\x80", 4), (b"\xf4\x90\x80\x80", 4), (b"\xff", 1), (b"\xe2\x82", 2)]
    results = ours.encode([(text, False) for text, _ in cases])
    for (text, n_bad), (ids, decoded) in zip(cases, results):
        assert_same_ids(ids, reference_ids(llm, "\ufffd".encode() * n_bad, False), text, "replacement")
        assert decoded == "\ufffd".encode() * n_bad


def test_random_strings(smollm):
    ours, llm = smollm
    texts = random_strings(seed=1234, count=2000)
    for special in (False, True):
        for text, (ids, _) in zip(texts, ours.encode([(t, special) for t in texts])):
            assert_same_ids(ids, reference_ids(llm, text, special), text, f"random string, special={special}")


def test_codepoint_class_boundaries(smollm, repo_root):
    """The first and last codepoint of every range in unicode_tables.h, between
    letters, digits and punctuation, where its class decides the word split."""
    import re

    header = (repo_root / "src" / "tokenizer" / "unicode_tables.h").read_text()
    starts = [int(v, 16) >> 3 for v in re.findall(r"0x([0-9A-F]{8})u", header)]
    codepoints = sorted({c for s in starts for c in (s, s - 1) if 0 <= c <= 0x10FFFF})
    assert len(codepoints) > 3000
    texts = []
    for cpt in codepoints:
        c = chr(cpt)
        texts.append(f"a{c}a 1{c}1 .{c}. {c}{c} {c}\n".encode("utf-8", "surrogatepass"))
    ours, llm = smollm
    for text, (ids, _) in zip(texts, ours.encode([(t, False) for t in texts])):
        assert_same_ids(ids, reference_ids(llm, text, False), text, "codepoint class")


def test_evaluation_split(smollm, eval_text_path):
    if not eval_text_path.is_file():
        pytest.skip(f"{eval_text_path} not found: run the setup script to make the evaluation split "
                    "(or set KVQ_EVAL_TEXT)")
    ours, llm = smollm
    text = eval_text_path.read_bytes()
    (plain, decoded), (parsed, _) = ours.encode([(text, False), (text, True)])
    assert_same_ids(plain, reference_ids(llm, text, False), text, "evaluation split")
    assert_same_ids(parsed, reference_ids(llm, text, True), text, "evaluation split, special")
    assert decoded == text
    print(f"evaluation split: {len(text)} bytes, {len(plain)} tokens, identical to llama.cpp")


def test_every_token_text(smollm):
    ours, llm = smollm
    n_vocab = llm.n_vocab()
    for token, text in enumerate(ours.token_texts(n_vocab)):
        assert text == reference_token_text(llm, token), f"token {token}"


def test_chat_template_matches_jinja(smollm):
    """apply_chat_template equals the GGUF's own template rendered by jinja2."""
    import jinja2

    ours, llm = smollm
    template = llm.metadata["tokenizer.chat_template"]
    message = "What is the capital of France? Answer in one word."
    expected = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": message}], add_generation_prompt=True)
    assert ours.chat(message) == expected


@pytest.mark.parametrize("pre", ["gpt-2", "default"])
def test_other_pre_tokenizers(testtool, model_path, eval_text_path, tmp_path, pre):
    variant = tmp_path / f"smollm2-pre-{pre}.gguf"
    write_pre_variant(model_path, variant, pre)
    ours, llm = Ours(testtool, variant, tmp_path), reference(variant)
    texts = [t for t, _ in HARD_STRINGS] + random_strings(seed=99, count=1000)
    if eval_text_path.is_file():  # optional here; test_evaluation_split reports its absence
        texts.append(eval_text_path.read_bytes()[:300_000])
    for text, (ids, _) in zip(texts, ours.encode([(t, False) for t in texts])):
        assert_same_ids(ids, reference_ids(llm, text, False), text, f"pre-tokenizer {pre}")
