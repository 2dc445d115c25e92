"""gradcomp.Int8 and the codec spec grammar (codecs.parse)."""

from __future__ import annotations

import gradcomp
import pytest
import torch
from gradcomp import codecs


def test_int8_defaults():
    c = gradcomp.Int8()
    assert gradcomp.Int8 is codecs.Int8
    assert isinstance(c, gradcomp.Codec)
    assert c.block_size == 256 and c.error_feedback is True
    assert c.bits == 8 and c.name == "int8"
    assert c.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert c.stochastic is False and c.residual_dtype is torch.float32
    assert c.config() == {"codec": "int8", "block_size": 256, "error_feedback": True, "stochastic": False,
                          "residual_dtype": "fp32"}
    assert repr(c) == "Int8(block_size=256, error_feedback=True, stochastic=False, residual_dtype=torch.float32)"
    assert eval(repr(c), {"Int8": gradcomp.Int8, "torch": torch}) == c


@pytest.mark.parametrize("block", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_int8_block_sizes(block):
    assert gradcomp.Int8(block_size=block).block_size == block
    assert codecs.parse(f"int8:block={block}") == gradcomp.Int8(block_size=block)


@pytest.mark.parametrize("block", [0, 1, 16, 31, 48, 100, 255, 257, 8192, -256, 256.0, "256", True, None])
def test_int8_bad_block_size(block):
    with pytest.raises(ValueError, match="gradcomp"):
        gradcomp.Int8(block_size=block)


@pytest.mark.parametrize(
    ("spec", "block", "ef"),
    [
        ("int8", 256, True),
        ("int8:block=512", 512, True),
        ("INT8 ", 256, True),
        ("  Int8:Block=1024  ", 1024, True),
        ("int8:ef=0", 256, False),
        ("int8:ef=1", 256, True),
        ("int8:block=32:ef=0", 32, False),
        ("int8:ef=0:block=4096", 4096, False),
    ],
)
def test_parse(spec, block, ef):
    c = codecs.parse(spec)
    assert type(c) is gradcomp.Int8
    assert (c.block_size, c.error_feedback) == (block, ef)


def test_parse_returns_codec_instances_as_is():
    c = gradcomp.Int8(block_size=64, error_feedback=False)
    assert codecs.parse(c) is c


@pytest.mark.parametrize("spec", [None, 8, b"int8", ["int8"]])
def test_parse_rejects_non_strings(spec):
    with pytest.raises(TypeError, match="gradcomp"):
        codecs.parse(spec)


@pytest.mark.parametrize(
    "spec",
    ["int9", "", "int", "int8:block=100", "int8:block=x", "int8:block=", "int8:block=-256", "int8:foo=1",
     "int8:block", "int8:", "int8:ef=2", "int8:ef=yes", "int8:block=8192", "int8;block=512", "topk:0.01:stochastic",
     "int8:stochastic=1", "int8:stoch", "sign:stochastic", "int8:residual=fp16", "int8:residual=", "fp16:stochastic",
     "bf16:residual=bf16", "topk", "topk:abc", "topk:2", "randomk:0.1:fp16", "topk:0.1:approx=1"],
)
def test_parse_bad_specs_list_valid_ones(spec):
    with pytest.raises(ValueError, match="valid specs") as info:
        codecs.parse(spec)
    msg = str(info.value)
    assert "gradcomp" in msg and repr(spec) in msg
    for valid in codecs.VALID_SPECS:
        assert valid in msg


def test_equality_and_hash_by_config():
    a, b = gradcomp.Int8(), codecs.parse("int8")
    assert a == b and hash(a) == hash(b) and a is not b
    assert gradcomp.Int8(block_size=512) == codecs.parse("int8:block=512")
    assert gradcomp.Int8(block_size=512) != gradcomp.Int8()
    assert gradcomp.Int8(error_feedback=False) != gradcomp.Int8()
    assert gradcomp.Int8(error_feedback=0) == gradcomp.Int8(error_feedback=False)
    assert a != "int8" and a != a.config()
    assert len({gradcomp.Int8(), codecs.parse("INT8"), codecs.parse("int8:ef=1"), codecs.parse("int8:ef=0"),
                gradcomp.Int8(block_size=32)}) == 3


@pytest.mark.parametrize(("cls", "name", "bits"), [(gradcomp.Int4, "int4", 4), (gradcomp.Int2, "int2", 2),
                                                   (gradcomp.Sign, "sign", 1)])
def test_low_bit_codecs_and_specs(cls, name, bits):
    c = cls()
    assert isinstance(c, codecs.BlockQuantizer) and c.name == name and c.bits == bits
    assert c.config() == {"codec": name, "block_size": 256, "error_feedback": True, "stochastic": False,
                          "residual_dtype": "fp32"}
    assert codecs.parse(name) == c and type(codecs.parse(name)) is cls
    assert codecs.parse(f"{name}:block=1024:ef=0") == cls(block_size=1024, error_feedback=False)
    assert c != gradcomp.Int8() and hash(c) != hash(gradcomp.Int8())
    with pytest.raises(ValueError, match="valid specs"):
        codecs.parse(f"{name}:block=48")


@pytest.mark.parametrize(("name", "cls", "wire"), [("fp16", gradcomp.Fp16, torch.float16),
                                                   ("bf16", gradcomp.Bf16, torch.bfloat16)])
def test_cast_codecs(name, cls, wire):
    c = codecs.parse(name)
    assert type(c) is cls and c == cls() and c.config() == {"codec": name}
    assert c.wire_dtype == wire and c.dtypes == (torch.float32,) and not c.error_feedback
    assert c != codecs.parse("int8")
    for bad in (f"{name}:block=256", f"{name}:ef=1"):
        with pytest.raises(ValueError, match="takes no options"):
            codecs.parse(bad)


@pytest.mark.parametrize(("spec", "stochastic", "residual"), [
    ("int8:stochastic", True, torch.float32),
    ("int4:stochastic:block=512", True, torch.float32),
    ("int2:residual=bf16", False, torch.bfloat16),
    ("int4:residual=bf16:stochastic", True, torch.bfloat16),
    ("sign:residual=bf16", False, torch.bfloat16),
    ("int8:residual=fp32", False, torch.float32),
])
def test_stochastic_and_residual_options(spec, stochastic, residual):
    c = codecs.parse(spec)
    assert (c.stochastic, c.residual_dtype) == (stochastic, residual)
    assert c == type(c)(block_size=c.block_size, stochastic=stochastic, residual_dtype=residual)
    assert c.config()["stochastic"] is stochastic
    assert c.config()["residual_dtype"] == {torch.float32: "fp32", torch.bfloat16: "bf16"}[residual]
    if stochastic:
        assert c != type(c)(block_size=c.block_size, residual_dtype=residual)
    if residual is torch.bfloat16:
        assert c != type(c)(block_size=c.block_size, stochastic=stochastic)
    assert type(c)(residual_dtype=residual) == type(c)(residual_dtype=c.config()["residual_dtype"])


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, "fp16", None, 4])
def test_bad_residual_dtype(bad):
    with pytest.raises(ValueError, match="residual_dtype"):
        gradcomp.Int4(residual_dtype=bad)


def test_sign_refuses_stochastic_rounding():
    with pytest.raises(ValueError, match="Sign has no stochastic"):
        gradcomp.Sign(stochastic=True)
    with pytest.raises(ValueError, match="valid specs"):
        codecs.parse("sign:stochastic")


def test_codecs_pickled_before_the_options_load_with_defaults():
    import pickle

    old = gradcomp.Int4.__new__(gradcomp.Int4)
    old.__dict__.update({"block_size": 512, "error_feedback": False})  # what an older State held
    back = pickle.loads(pickle.dumps(old))
    assert back == gradcomp.Int4(block_size=512, error_feedback=False)
