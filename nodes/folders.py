"""Where 4-bit files live: ComfyUI's models/diffusion_models, plus models/svdquant (registered here)."""
import os

import folder_paths

FOLDER = "svdquant"


def register() -> None:
    path = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], {".safetensors"})


def list_models() -> list:
    """`svdquant/<file>` and `diffusion_models/<file>` entries, safetensors only (never pickle)."""
    out = []
    for folder in (FOLDER, "diffusion_models"):
        out += [f"{folder}/{f}" for f in folder_paths.get_filename_list(folder) if f.endswith(".safetensors")]
    return out


def resolve(entry: str) -> str:
    folder, _, name = entry.partition("/")
    if folder not in (FOLDER, "diffusion_models") or not name:
        raise ValueError(f"model_name {entry!r} must start with {FOLDER}/ or diffusion_models/")
    return folder_paths.get_full_path_or_raise(folder, name)


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]
