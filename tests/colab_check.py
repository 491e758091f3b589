"""Run a chapter the way a Colab reader does, in a fresh environment.

    python tests/colab_check.py [NOTEBOOK] [--keep]

NOTEBOOK defaults to book/02_scaled_dot_product.ipynb. Colab comes with PyTorch,
NumPy, Matplotlib, tqdm and Jupyter installed, and a chapter's first cell
installs only ``attn_lib``, from the repository. This check rebuilds that
situation and runs the chapter in it:

1. a new virtual environment, without access to this machine's packages;
2. PyTorch and the packages it needs are linked in from the environment that
   runs this script (torch==2.13.0, a CPU build standing in for Colab's own
   PyTorch; linking saves copying 1 GB); NumPy, Matplotlib, tqdm, ipykernel and
   nbconvert are installed by pip at the versions of requirements.txt;
3. the notebook is copied to an empty folder; its first cell, unchanged except
   that the repository URL becomes a clean copy of this working tree (its
   git-tracked files), runs its Colab branch (a stand-in ``google.colab``
   module is registered for that one cell), so ``%pip`` installs ``attn_lib``
   non-editable into the new environment;
4. nbconvert executes the notebook top to bottom in that environment's kernel;
   a cell added after the install checks that ``attn_lib`` came from the new
   environment and that PyTorch was left as it was.

Exit status 0 when the notebook ran without an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NOTEBOOK = "book/02_scaled_dot_product.ipynb"
PREINSTALLED_LINKED = "torch"  # with its dependencies
PREINSTALLED_PIP = ["numpy", "matplotlib", "tqdm", "ipykernel", "nbconvert"]
COLAB_GUARD = 'if "google.colab" in sys.modules:'
INSTALL = re.compile(r'(attn_lib @ )git\+\S+?(")')


def run(cmd: list[str], **kwargs) -> None:
    """Run a command, echoing it; stop the check when it fails."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def pins(names: list[str]) -> list[str]:
    """``name==version`` for each name, from requirements.txt."""
    text = (ROOT / "requirements.txt").read_text()
    found = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    return [f"{n}=={found[n]}" if n in found else n for n in names]


def dependency_closure(name: str) -> list:
    """The installed distribution ``name`` and everything it requires, recursively."""
    seen: dict[str, object] = {}
    todo = [name]
    while todo:
        key = canonicalize_name(todo.pop())
        if key in seen or key == "setuptools":  # the new environment has its own
            continue
        try:
            dist = distribution(key)
        except PackageNotFoundError:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def link_preinstalled(venv: Path) -> str:
    """Make torch and its dependencies importable (and pip-visible) in ``venv``."""
    site = venv / "colab-preinstalled"
    site.mkdir()
    for dist in dependency_closure(PREINSTALLED_LINKED):
        tops = {
            Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")
        }
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    packages = next((venv / "lib").glob("python3*/site-packages"))
    (packages / "colab_preinstalled.pth").write_text(f"{site}\n")
    return distribution("torch").version


def clean_copy(dest: Path) -> Path:
    """The working tree's git-tracked files, as a clone of the repository would have."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def code_cell(source: str) -> dict:
    return {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {},
        "outputs": [],
        "source": source,
    }


def colab_notebook(notebook: Path, src: Path, torch_version: str, dest: Path) -> Path:
    """A copy of ``notebook`` whose first cell installs attn_lib from ``src``."""
    nb = json.loads(notebook.read_text())
    first = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    source = "".join(nb["cells"][first]["source"])
    if COLAB_GUARD not in source or not INSTALL.search(source):
        sys.exit(f"{notebook}: the first code cell does not install attn_lib in Colab")
    nb["cells"][first]["source"] = INSTALL.sub(rf"\g<1>file://{src}\g<2>", source)
    before = code_cell(
        "# colab-check: pretend to be Colab for the install cell only\n"
        "import sys, types\n"
        'sys.modules["google.colab"] = types.ModuleType("google.colab")'
    )
    after = code_cell(
        "# colab-check: attn_lib came from this fresh environment, torch stayed\n"
        'del sys.modules["google.colab"]\n'
        "import attn_lib, torch\n"
        "assert attn_lib.__file__.startswith(sys.prefix), attn_lib.__file__\n"
        f"assert torch.__version__ == {torch_version!r}, torch.__version__\n"
        'print("colab-check: attn_lib from", attn_lib.__file__)'
    )
    nb["cells"][first : first + 1] = [before, nb["cells"][first], after]
    out = dest / notebook.name
    out.write_text(json.dumps(nb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", nargs="?", default=DEFAULT_NOTEBOOK, type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    notebook = (ROOT / args.notebook).resolve()
    if not notebook.is_file():
        sys.exit(f"no notebook {notebook}")

    work = Path(tempfile.mkdtemp(prefix="colab-check-"))
    times: dict[str, float] = {}
    try:
        start = time.monotonic()
        venv = work / "venv"
        run([sys.executable, "-m", "venv", venv])
        torch_version = link_preinstalled(venv)
        python = venv / "bin" / "python"
        run([python, "-m", "pip", "install", "-q", *pins(PREINSTALLED_PIP)])
        times["environment"] = time.monotonic() - start

        (work / "src").mkdir()
        (work / "run").mkdir()
        src = clean_copy(work / "src")
        copy = colab_notebook(notebook, src, torch_version, work / "run")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        }
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["JUPYTER_DATA_DIR"] = str(work / "jupyter")  # no user kernels
        start = time.monotonic()
        run(
            [
                python,
                "-m",
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--ExecutePreprocessor.timeout=900",
                "--ExecutePreprocessor.kernel_name=python3",
                "--output",
                "executed.ipynb",
                copy,
            ],
            env=env,
            cwd=work / "run",
        )
        times["notebook"] = time.monotonic() - start

        executed = json.loads((work / "run" / "executed.ipynb").read_text())
        cells = [c for c in executed["cells"] if c["cell_type"] == "code"]
        text = "".join("".join(o.get("text", "")) for c in cells for o in c["outputs"])
        if "colab-check: attn_lib from" not in text:
            sys.exit("the install check cell printed nothing")
        print(
            f"colab check passed: {args.notebook} ran in a fresh environment "
            f"(torch {torch_version} preinstalled, attn_lib from the Colab cell); "
            f"{len(cells)} code cells; environment {times['environment']:.0f} s, "
            f"notebook {times['notebook']:.0f} s"
        )
    finally:
        if args.keep:
            print("work folder kept:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
