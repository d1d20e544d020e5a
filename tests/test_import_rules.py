"""The dependency rule of WORKSPACE.md, checked on the source tree (imports anywhere in a module count)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "shared": {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "transformers", "vllm", "torchvision"},
    "learner_jax": {"torch", "transformers", "vllm", "torchvision"},
    "rollout_torch": {"jax", "jaxlib", "flax", "optax", "orbax"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_dependency_rule(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


# Between the project's packages the arrows point one way: the learner drives the bridge, the bridge's receiver
# half hosts rollout engines, and everyone reads `shared` (which holds the parameter table).
PROJECT_FORBIDDEN = {
    "shared": {"learner_jax", "rollout_torch", "bridge"},
    "bridge": {"learner_jax"},
    "rollout_torch": {"learner_jax", "bridge"},
}


@pytest.mark.parametrize("package", sorted(PROJECT_FORBIDDEN))
def test_project_packages_import_in_one_direction(package):
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & PROJECT_FORBIDDEN[package])
           for f in sorted((ROOT / package).rglob("*.py"))}  # fmt: skip
    assert not {k: v for k, v in bad.items() if v}


# Fragments only a Hugging Face parameter name contains. Outside the parameter table they may appear in
# docstrings and comments (documentation), never in code.
HF_NAME_FRAGMENTS = ("_proj", "embed_tokens", "layernorm", "lm_head.", "model.layers", "visual.blocks",
                     "visual.merger", "patch_embed.proj", "score.weight", "language_model.")  # fmt: skip
TABLES = {"shared/models/qwen2_5_vl_params.py"}


def _code_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}  # fmt: skip
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]  # fmt: skip


def test_only_the_parameter_table_spells_hf_parameter_names():
    offenders = {}
    for package in ("shared", "learner_jax", "bridge", "rollout_torch"):
        for f in sorted((ROOT / package).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            if rel in TABLES:
                continue
            hits = [s for s in _code_strings(f) if any(frag in s for frag in HF_NAME_FRAGMENTS)]
            if hits:
                offenders[rel] = hits[:3]
    assert not offenders
