"""Manual check (not run in CI: writes 2 GiB): load, compare and run a model over 2 GiB.

    python benchmarks/check_over_2gib.py   # 2026-11-21: loaded in 10.7 s, compare done in 43 s

It writes big.onnx and big.bin (2 GiB) into a new folder under benchmarks/work/; delete it afterwards.
"""
import numpy as np, onnx, time
from _work import work_dir
from onnx import helper, TensorProto, numpy_helper
rows = 2**30 // 32 + 1000  # two tables of 8 floats x 4 bytes: > 2 GiB together
table = np.ones((rows, 8), np.float32)
g = helper.make_graph([helper.make_node("Gather", ["table", "idx"], ["g"], name="gather"),
                       helper.make_node("Gather", ["table2", "idx"], ["g2"], name="gather2"), helper.make_node("Add", ["g", "g2"], ["s"], name="add"), helper.make_node("Mul", ["s", "two"], ["y"], name="mul")], "big",
                      [helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                      [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table, "table2"), numpy_helper.from_array(np.float32(2), "two")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
del table
path = work_dir("over-2gib-") / "big.onnx"
onnx.save(m, str(path), save_as_external_data=True, location="big.bin")
del m
import aligner
t=time.time(); graph = aligner.ModelGraph.load(path); print("loaded", time.time()-t)
feeds={"idx": np.array([0, 5, rows-1, 7], np.int64)}
r = aligner.compare(graph, target="emu:fp16", feeds=feeds); print(r.verdict(), time.time()-t)
print(aligner.reference_runner(graph).run(feeds)["y"][0])
print(f"(model in {path.parent}; delete when done)")
