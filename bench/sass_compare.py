"""Compare the SASS (sm_90a, or the archs named) of two builds of the kernel library, function by function: for a refactor that
should not change what the kernels do (no GPU needed).

    SVDQ_BUILD_DIR=/tmp/before bash kernels/build.sh --fast     # on the old commit
    SVDQ_BUILD_DIR=/tmp/after bash kernels/build.sh --fast      # on the new one
    python3 bench/sass_compare.py /tmp/before/libsvdq_kernels.so /tmp/after/libsvdq_kernels.so [sm_80 ...]

Per function: instruction count before/after, "identical" (same instruction text), else whether the multiset
of the heavy opcodes (tensor-core, TMA, mbarrier, loads/stores, float math) is the same, and the opcodes whose
counts differ. Exit status 1 when a function is missing on one side or its heavy-opcode multiset differs.
"""
import glob
import pathlib
import re
import shutil
import subprocess
import sys
from collections import Counter

REPO = pathlib.Path(__file__).resolve().parents[1]

HEAVY = re.compile(r"GMMA|HMMA|IMMA|UTMA|SYNCS|LDS|STS|LDG|STG|LDSM|LDGSTS|RED|ATOM|BAR|WARPGROUP|"
                   r"FFMA|FMUL|FADD|FMNMX|HFMA|I2F|F2F|F2I|SHFL")


def cuobjdump() -> str:
    """cuobjdump from PATH, else the one Triton's wheel ships (as bench/sass_mix.sh)."""
    found = shutil.which("cuobjdump") or next(iter(sorted(glob.glob(
        str(REPO / ".venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump")))), None)
    if not found:
        sys.exit("no cuobjdump: install the CUDA toolkit's, or run scripts/setup_comfyui.sh (Triton ships one)")
    return found


def functions(lib: str, arch: str) -> dict:
    """mangled name -> list of instruction texts (predicate included), of the cubin for `arch`."""
    text = subprocess.run([cuobjdump(), "-sass", "-arch", arch, lib], capture_output=True, text=True,
                          check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append(m.group(1))
    return out


def opcode(ins: str) -> str:
    return ins.split()[1] if ins.startswith("@") else ins.split()[0]


def main(before: str, after: str, arch: str = "sm_90a") -> int:
    a, b = functions(before, arch), functions(after, arch)
    bad = sorted(set(a) ^ set(b))
    for name in bad:
        print(f"only in {'before' if name in a else 'after'}: {name}")
    for name in sorted(set(a) & set(b)):
        if a[name] == b[name]:
            print(f"{name[:70]:70s} {len(a[name]):5d} identical")
            continue
        ca, cb = Counter(map(opcode, a[name])), Counter(map(opcode, b[name]))
        heavy_same = Counter({k: v for k, v in ca.items() if HEAVY.search(k)}) == \
            Counter({k: v for k, v in cb.items() if HEAVY.search(k)})
        diff = {k: (ca[k], cb[k]) for k in sorted(set(ca) | set(cb)) if ca[k] != cb[k]}
        print(f"{name[:70]:70s} {len(a[name]):5d} -> {len(b[name]):5d} "
              f"heavy ops {'same' if heavy_same else 'DIFFER'}; {diff}")
        if not heavy_same:
            bad.append(name)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(max(main(sys.argv[1], sys.argv[2], arch) for arch in (sys.argv[3:] or ["sm_90a"])))
