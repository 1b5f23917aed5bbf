"""compile_model validates its options up front and names the problem."""
import pytest

from lowering import compile_model
from lowering.models import llama
from lowering.pipeline import CompileOptions, OptionsError, build_pipeline
from tests.lowering.helpers import tiny_config


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "metal"}, "unknown target 'metal'"),
    ({"block_size": 0}, "block_size must be an integer"),
    ({"block_size": 2.5}, "block_size must be an integer"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
    ({"max_model_len": -4}, "max_model_len must be a positive integer"),
    ({"weights": "gguf", "target": "cuda"}, "weights='gguf' .* runs on the cpu and tpu targets"),
])
def test_bad_options_are_refused_before_any_work(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        compile_model("/definitely/not/a/checkpoint", **kwargs)


def test_max_model_len_beyond_the_model_is_refused():
    model = llama.build_model(tiny_config(max_position_embeddings=64))
    with pytest.raises(OptionsError, match="exceeds the model's max_position_embeddings 64"):
        compile_model(model, max_model_len=65)


def test_unsupported_source_type():
    with pytest.raises(OptionsError, match="cannot compile a int"):
        compile_model(42)


def test_missing_checkpoint_path_is_a_clear_error():
    from lowering.checkpoints import CheckpointError

    with pytest.raises(CheckpointError):
        compile_model("/definitely/not/a/checkpoint")


def test_pipeline_is_one_ordered_list():
    names = [name for name, _ in build_pipeline(CompileOptions())]
    assert names == ["canonicalize", "fuse_projections", "insert_paged_kv", "canonicalize"]
    names = [name for name, _ in build_pipeline(CompileOptions(fuse_projections=False))]
    assert "fuse_projections" not in names


def test_verbose_compile_prints_one_line_per_pass_and_dumps_ir(tmp_path, capsys):
    model = llama.build_model(tiny_config())
    compile_model(model, verbose=True, dump_ir=str(tmp_path))
    err = capsys.readouterr().err
    assert err.count(" pass ") == 4 and "insert_paged_kv" in err and "nodes" in err
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["00_traced.txt", "01_canonicalize.txt", "02_fuse_projections.txt", "03_insert_paged_kv.txt",
                     "04_canonicalize.txt"]
    assert "paged_attention(" in (tmp_path / "03_insert_paged_kv.txt").read_text()


def test_gguf_weights_need_a_gguf_checkpoint():
    from lowering.quant.passes import QuantError

    model = llama.build_model(tiny_config())
    with pytest.raises(QuantError, match="has none"):
        compile_model(model, config=tiny_config(), weights="gguf", progress=False)
