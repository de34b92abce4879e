"""Packaging: what the core install imports, what importing aligner does, and that every third-party
import in the package is declared in pyproject.toml (and every declared dependency is imported).

``test_graph.py::test_import_aligner_stays_light`` checks the four heavy modules after
``import aligner``; here the CLI's import and every optional module are checked too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "aligner", ROOT / "plugins"]  # plugins/ installs as aligner_plugins

# Optional or heavy: never imported by `import aligner` or by the CLI before a command runs.
NOT_AT_IMPORT = ("torch", "tensorrt", "tensorrt_rtx", "triton", "pycocotools", "faster_coco_eval", "matplotlib", "jinja2",
                 "PIL", "transformers", "onnxruntime_extensions", "pynvml", "polygraphy", "aligner_plugins",
                 "model_explorer", "model_explorer_onnx")

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "google": "protobuf", "pynvml": "nvidia-ml-py", "onnxruntime_extensions": "onnxruntime-extensions",
                "faster_coco_eval": "faster-coco-eval", "model_explorer": "ai-edge-model-explorer"}
# Imported, not declared, on purpose.
UNDECLARED = {"tensorrt_rtx": "TensorRT-RTX, the alternative to the tensorrt extra (ALIGNER_TENSORRT), is not on the index as one package"}
# Imported by a name held in a variable (load_tensorrt tries each of MODULES): module -> the file.
BY_NAME = {"tensorrt": "aligner/backends/trt/engine.py"}
# Declared, not imported by aligner, on purpose.
NOT_IMPORTED = {"onnxscript": "torch.onnx's dynamo exporter needs it (torch extra)",
                "onnxruntime-gpu": "provides the onnxruntime module with the CUDA provider (gpu extra)"}


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()


def test_import_aligner_and_its_cli_load_no_optional_module():
    out = _run(f"""
        import sys
        import aligner, aligner.cli.main
        print([m for m in {NOT_AT_IMPORT!r} if m in sys.modules])
    """)
    assert out == "[]", f"imported at `import aligner` / the CLI's import: {out}"


def test_importing_aligner_registers_no_plugin_schema_and_loading_a_plugin_model_does():
    out = _run("""
        import sys, tempfile
        import onnx
        from onnx import TensorProto, helper
        import aligner.graph.load
        import aligner
        before = (onnx.defs.has("MaskedSoftmax", "aligner"), "aligner_plugins" in sys.modules, "onnxruntime" in sys.modules)
        node = helper.make_node("MaskedSoftmax", ["s", "keep"], ["p"], name="softmax", domain="aligner")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4]),
                                               helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 4])],
                                  [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("aligner", 1)], ir_version=8)
        path = tempfile.mkdtemp() + "/plugin.onnx"
        onnx.save(model, path)
        aligner.load_model(path)  # the checker must know the plugin op
        print(before, onnx.defs.has("MaskedSoftmax", "aligner"))
    """)
    assert out == "(False, False, False) True", out


def _imports(root: Path) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under ``root`` (inside functions too, and
    ``require("x")`` / ``importlib.import_module("x")`` with a literal name) -> the files."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and (getattr(node.func, "id", None) in ("require", "check") or getattr(node.func, "attr", None) == "import_module")):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top and top not in sys.stdlib_module_names and not top.startswith("aligner"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """Distribution -> where pyproject.toml declares it ("core" or the extra's name)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    declared: dict[str, str] = {}
    for group, requirements in groups.items():
        for requirement in requirements:
            name = _normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group())
            if name != "aligner":
                declared.setdefault(name, group)
    return declared


def test_every_third_party_import_is_declared_in_pyproject():
    declared = _declared()
    missing = {module: sorted(files) for root in SOURCES for module, files in _imports(root).items()
               if module not in UNDECLARED and _normalize(DISTRIBUTION.get(module, module)) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml (dependencies or an extra): {missing}"


def test_every_declared_dependency_is_imported_by_aligner():
    declared = _declared()
    imported = {_normalize(DISTRIBUTION.get(m, m)) for root in SOURCES for m in _imports(root)}
    for module, file in BY_NAME.items():
        assert f'"{module}"' in (ROOT / file).read_text(), f"{file} no longer names {module}: update BY_NAME"
        imported.add(_normalize(module))
    unused = sorted(name for name, group in declared.items()
                    if group != "dev" and name not in imported and name not in NOT_IMPORTED)  # dev: tests, notebooks, benchmarks
    assert not unused, f"declared in pyproject.toml but imported nowhere in aligner/ or plugins/: {unused}"


def test_core_dependencies_include_what_the_demo_needs_and_no_platform_package():
    core = {name for name, group in _declared().items() if group == "core"}
    assert {"pycocotools", "pillow", "matplotlib", "jinja2"} <= core
    assert not core & {"torch", "tensorrt", "onnxruntime-gpu", "polygraphy", "onnxruntime-extensions", "triton", "psutil"}


def test_the_version_is_said_once_and_matches_pyproject():
    from aligner.version import __version__

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared
    import aligner

    assert aligner.__version__ == declared
