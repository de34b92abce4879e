"""Start Model Explorer on a model with aligner's overlays (the ``view`` extra).

``model_explorer`` (ai-edge-model-explorer) and its ONNX adapter ``model_explorer_onnx``
(model-explorer-onnx) are imported here only, inside functions. Model Explorer runs in this process
(its Flask server, on a thread); :func:`serve` blocks until Ctrl+C, as ``model-explorer`` does.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable

from aligner._optional import installed
from aligner.errors import InputError, MissingDependencyError
from aligner.report.graph_overlay import ADAPTER_EXTENSION, ADAPTER_ID, VIEWER_PORT, GraphOverlays

# module -> pip package; both are in the ``view`` extra (pyproject.toml)
VIEW_MODULES = {"model_explorer": "ai-edge-model-explorer", "model_explorer_onnx": "model-explorer-onnx"}


class ViewerError(InputError):
    """Model Explorer cannot show the model (its ONNX adapter failed on it)."""


def check_viewer(purpose: str = "aligner view (Model Explorer)") -> None:
    """Raise MissingDependencyError naming ``aligner[view]`` when the viewer is not installed; imports nothing."""
    for module, package in VIEW_MODULES.items():
        if not installed(module):
            raise MissingDependencyError(package, "view", purpose)


def adapter_notes(overlays: GraphOverlays) -> list[str]:
    """Convert the model with Model Explorer's ONNX adapter, as the server will, and check that every
    overlay key is a node id it produces. Raises ViewerError when the adapter cannot read the model."""
    from model_explorer_onnx.main import ONNXAdapter

    try:
        graphs = ONNXAdapter().convert(str(overlays.model), {})["graphs"]
    except Exception as exc:  # whatever the adapter raises: the viewer would show the same failure
        raise ViewerError(f"Model Explorer's ONNX adapter cannot show {overlays.model}: {type(exc).__name__}: {exc}. "
                          f"The node-data files are in {overlays.directory}.") from None
    shown = {node.id for graph in graphs for node in graph.nodes}
    used = {overlays.ids[n] for o in overlays.overlays for n in o.values if n in overlays.ids}
    unknown = sorted(used - shown)
    if unknown:
        return [f"{len(unknown)} overlay key(s) are not node ids of Model Explorer's ONNX adapter (e.g. {', '.join(unknown[:3])}); "
                "those nodes stay uncoloured. Please report this with the model."]
    return []


def pick_port(host: str, port: int, explicit: bool) -> int:
    """``port`` if free; a port asked for explicitly must be free, else the next free one up to +19."""
    for candidate in ([port] if explicit else range(port, port + 20)):
        if not _in_use(host, candidate):
            return candidate
    if explicit:
        raise InputError(f"Port {port} on {host} is in use (another Model Explorer?); choose another with --port.")
    raise InputError(f"Ports {port}-{port + 19} on {host} are all in use; choose one with --port.")


def serve(overlays: GraphOverlays, host: str = "localhost", port: int = VIEWER_PORT, node: str = "", prefer: str = "",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run Model Explorer with the model and every overlay until Ctrl+C. ``on_ready(url)`` is called
    once the server answers, with a URL that opens the graph on ``node`` (see GraphOverlays.link)."""
    import model_explorer

    config = model_explorer.config()
    config.add_model_from_path(str(overlays.model), adapterId=ADAPTER_ID)
    for path in overlays.files:
        config.add_node_data_from_path(str(path))
    url = overlays.link(node, prefer, port=port, host=host)
    if on_ready is not None:
        threading.Thread(target=_when_up, args=(host, port, url, on_ready), daemon=True).start()
    model_explorer.visualize_from_config(config=config, host=host, port=port, extensions=[ADAPTER_EXTENSION], no_open_in_browser=True)


def _when_up(host: str, port: int, url: str, on_ready: Callable[[str], None], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/check_health", timeout=2) as response:
                if response.read() == b"model_explorer_ok":
                    on_ready(url)
                    return
        except OSError:
            pass
        time.sleep(0.3)


def _in_use(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return s.connect_ex((host, port)) == 0
    except socket.gaierror:
        raise InputError(f"Host {host!r} cannot be resolved; give an address such as 127.0.0.1 with --host.") from None


__all__ = ["VIEW_MODULES", "ViewerError", "adapter_notes", "check_viewer", "pick_port", "serve"]
