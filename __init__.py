"""ComfyUI entry of the SVDQuant node pack. Keep imports light: no CUDA init, no compile here."""
import importlib.util

WEB_DIRECTORY = "./web"

# Outside ComfyUI (pytest collects this folder as a package, scripts import core/) there are no
# nodes to register; inside it, `folder_paths` is always importable.
if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import folders as _folders

    _folders.register()
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
