"""read_gguf gives what the gguf package's GGUFReader gives (metadata values, tensor types, shapes, bytes)."""
import gguf
import numpy as np
import pytest

from lowering.checkpoints.gguf_file import GGUFFormatError, read_gguf
from lowering.checkpoints.gguf_loader import read_metadata

Q = gguf.GGMLQuantizationType


def assert_same_as_gguf_reader(path):
    metadata, tensors = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert metadata == read_metadata(reader)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for got, want in zip(tensors, reader.tensors):
        assert got.tensor_type == want.tensor_type, got.name
        np.testing.assert_array_equal(got.shape, want.shape, err_msg=got.name)
        assert got.data.shape == want.data.shape and got.data.dtype == want.data.dtype, got.name
        np.testing.assert_array_equal(got.data, want.data, err_msg=got.name)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1])
def test_read_gguf_matches_gguf_reader(tmp_path, ckb, qtype):
    cfg = ckb.TinyLlama()
    metadata = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0, "test.count": 7}
    ckb.write_gguf(tmp_path / "m.gguf", cfg, ckb.make_hf_weights(cfg), qtype=qtype, metadata=metadata)
    assert_same_as_gguf_reader(tmp_path / "m.gguf")


def test_read_gguf_values_and_alignment(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    writer.add_custom_alignment(64)
    writer.add_bool("x.flag", True)
    writer.add_int64("x.big", -(2**40))
    writer.add_float64("x.f64", 0.1)
    writer.add_array("x.floats", [0.5, -1.25])
    writer.add_array("x.words", ["a", "  ", "\u2581b", "日本"])
    writer.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, tensors = read_gguf(tmp_path / "v.gguf")
    assert metadata["general.alignment"] == 64 and metadata["x.flag"] is True
    assert metadata["x.big"] == -(2**40) and metadata["x.f64"] == 0.1
    assert metadata["x.floats"] == [0.5, -1.25] and metadata["x.words"] == ["a", "  ", "\u2581b", "日本"]
    np.testing.assert_array_equal(tensors[0].data, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert_same_as_gguf_reader(tmp_path / "v.gguf")


def test_read_gguf_rejects_bad_bytes(tmp_path, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    cases = {"magic": b"GGUX" + data[4:], "version": data[:4] + (9).to_bytes(4, "little") + data[8:],
             "truncated": data[:2000], "no data": data[: len(data) - 64]}
    messages = {"magic": "magic", "version": "version 9", "truncated": "unexpected end of file",
                "no data": "runs past the end"}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(GGUFFormatError, match=messages[name]):
            read_gguf(path)
