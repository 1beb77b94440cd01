"""The Triton model of the TensorRT engine built from ``fluxshard_trt.onnx``: its config.pbtxt,
written from the ONNX graph itself (names, types, shapes), so it fits whatever size and model
``fluxshard export`` made the graph for.

* platform ``tensorrt_plan``, ``max_batch_size: 0`` (the graph is made for one frame: its RFAP
  plan inputs ``field_index_s`` have no batch axis), one GPU instance;
* inputs: ``images`` and the RFAP plan (``field_index_s``, ``invalid_s``, the
  ``rfap_cond1_*`` masks), exactly what ``FluxShardGraph.feeds`` computes; output ``output0``
  (and ``output1`` for seg), the head's raw maps as the ONNX gives them;
* every ``cache_in_NNN`` / ``cache_out_NNN`` pair is sequence-batcher implicit state: Triton
  keeps each stream's per-layer caches between its requests and starts a stream's caches at
  zeros (a key frame, all ``invalid_s`` True, recomputes everything, so zeros are never read);
  the pairs are listed in sorted order, the index padded so names sort as the layers do;
* ``oldest`` sequence batching: up to ``--candidates`` streams interleave on one instance, one
  frame per execution (no batching: the graph is batch 1), each with its own state.

The plugin library is not named here: the TensorRT backend loads plugins for the whole server
(``--backend-config=tensorrt,plugins=...``, see export/README.md).

    python3 export/triton_config.py out/export/fluxshard_trt.onnx --repository REPO
        # REPO/fluxshard_trt/config.pbtxt (model.plan) and configs/fp16.pbtxt (model_fp16.plan)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODEL_NAME = "fluxshard_trt"
STATE_IN, STATE_OUT = "cache_in_", "cache_out_"
FP32_PLAN, FP16_PLAN = "model.plan", "model_fp16.plan"
# the python model's stream limits (model_repository/fluxshard/config.pbtxt), kept alike
MAX_SEQUENCE_IDLE_US = 30_000_000
CANDIDATE_SEQUENCES = 16


def _triton_type(elem_type: int) -> str:
    import onnx

    names = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
             onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
             onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8"}
    if elem_type not in names:
        raise ValueError(f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} has no "
                         "Triton TensorRT type here")
    return names[elem_type]


def graph_io(onnx_path: str | Path) -> tuple[list[tuple[str, str, list[int]]],
                                              list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of the graph as (name, Triton type, dims), in graph order; every dim
    must be fixed (the FluxShard graph is made for one size)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def rows(values):
        out = []
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in v.type.tensor_type.shape.dim]
            if any(d <= 0 for d in dims):
                raise ValueError(f"{onnx_path}: {v.name} has a dynamic shape {dims}: the "
                                 "FluxShard graph has fixed shapes")
            out.append((v.name, _triton_type(v.type.tensor_type.elem_type), dims))
        return out

    return rows(model.graph.input), rows(model.graph.output)


def state_pairs(inputs, outputs) -> list[tuple[str, str, str, list[int]]]:
    """(cache_in, cache_out, type, dims) of every state pair, sorted by name: the k-th input
    in sorted order pairs with the k-th output, and the two must have the same index suffix,
    type and shape (ValueError saying which pair does not)."""
    ins = sorted((r for r in inputs if r[0].startswith(STATE_IN)), key=lambda r: r[0])
    outs = sorted((r for r in outputs if r[0].startswith(STATE_OUT)), key=lambda r: r[0])
    if len(ins) != len(outs):
        raise ValueError(f"{len(ins)} {STATE_IN}* inputs but {len(outs)} {STATE_OUT}* outputs")
    pairs = []
    for (iname, itype, idims), (oname, otype, odims) in zip(ins, outs):
        if (iname.removeprefix(STATE_IN) != oname.removeprefix(STATE_OUT) or itype != otype
                or idims != odims):
            raise ValueError(f"state {iname} ({itype} {idims}) does not pair with {oname} "
                             f"({otype} {odims}) in sorted order")
        pairs.append((iname, oname, itype, idims))
    return pairs


def model_config(onnx_path: str | Path, name: str = MODEL_NAME,
                 default_model_filename: str = FP32_PLAN,
                 candidates: int = CANDIDATE_SEQUENCES):
    """The ModelConfig protobuf (tritonclient's model_config_pb2) for the engine of
    ``onnx_path``."""
    from tritonclient.grpc import model_config_pb2 as mc

    inputs, outputs = graph_io(onnx_path)
    pairs = state_pairs(inputs, outputs)
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=0,
                            default_model_filename=default_model_filename)
    for iname, dtype, dims in inputs:
        if not iname.startswith(STATE_IN):
            config.input.add(name=iname, data_type=mc.DataType.Value(dtype), dims=dims)
    for oname, dtype, dims in outputs:
        if not oname.startswith(STATE_OUT):
            config.output.add(name=oname, data_type=mc.DataType.Value(dtype), dims=dims)
    seq = config.sequence_batching
    seq.max_sequence_idle_microseconds = MAX_SEQUENCE_IDLE_US
    seq.oldest.max_candidate_sequences = candidates
    seq.oldest.max_queue_delay_microseconds = 0
    for iname, oname, dtype, dims in pairs:
        state = seq.state.add(input_name=iname, output_name=oname,
                              data_type=mc.DataType.Value(dtype), dims=dims)
        state.initial_state.add(data_type=mc.DataType.Value(dtype), dims=dims, zero_data=True,
                                name="zeros")
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0])
    return config


def render(message, indent: str = "") -> str:
    """Text format with each element of a repeated message field on one line (the 80-odd state
    pairs stay readable); parses back to the same message."""
    from google.protobuf import text_format
    from google.protobuf.descriptor import FieldDescriptor

    lines = []
    for field, value in message.ListFields():
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        repeated = (field.is_repeated if hasattr(field, "is_repeated")
                    else field.label == FieldDescriptor.LABEL_REPEATED)
        if is_message and repeated:
            items = [f"{indent}  {{ {text_format.MessageToString(v, as_one_line=True)} }}"
                     for v in value]
            lines.append(f"{indent}{field.name} [\n" + ",\n".join(items) + f"\n{indent}]")
        elif is_message:
            lines.append(f"{indent}{field.name} {{\n{render(value, indent + '  ')}{indent}}}")
        else:
            single = type(message)()
            getattr(single, field.name)  # scalars and repeated scalars copy alike
            if repeated:
                getattr(single, field.name).extend(value)
            else:
                setattr(single, field.name, value)
            lines.append(indent + text_format.MessageToString(single, as_one_line=True))
    return "".join(line + "\n" for line in lines)


def config_text(onnx_path: str | Path, default_model_filename: str = FP32_PLAN,
                candidates: int = CANDIDATE_SEQUENCES) -> str:
    config = model_config(onnx_path, default_model_filename=default_model_filename,
                          candidates=candidates)
    head = (f"# Written by export/triton_config.py from {Path(onnx_path).name} (inputs "
            f"{', '.join(i.name for i in config.input)[:200]}; "
            f"{len(config.sequence_batching.state)} state pairs); the engine: "
            f"{default_model_filename} (scripts/build_trt_engine.sh). Serve with\n"
            "# tritonserver --backend-config=tensorrt,plugins=<libfluxshard_trt_triton.so> "
            "(export/README.md).\n")
    return head + render(config)


def write_repository(onnx_path: str | Path, repository: str | Path,
                     candidates: int = CANDIDATE_SEQUENCES) -> Path:
    """REPOSITORY/fluxshard_trt/config.pbtxt (FP32 engine) and configs/fp16.pbtxt (the FP16
    one, ``--model-config-name=fp16``); returns the model folder."""
    folder = Path(repository) / MODEL_NAME
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_text(onnx_path, FP32_PLAN, candidates))
    (folder / "configs" / "fp16.pbtxt").write_text(config_text(onnx_path, FP16_PLAN, candidates))
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path, help="fluxshard_trt.onnx (fluxshard export)")
    ap.add_argument("--repository", type=Path, required=True,
                    help="model repository to write fluxshard_trt/ into")
    ap.add_argument("--candidates", type=int, default=CANDIDATE_SEQUENCES,
                    help="streams one instance interleaves (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.onnx.is_file():
        ap.error(f"{args.onnx} not found: write it with `fluxshard export`")
    try:
        folder = write_repository(args.onnx, args.repository, args.candidates)
    except ValueError as e:
        print(f"triton_config: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
