"""The public surface is small and deliberate; changing it must be a conscious act."""

import subprocess
import sys

import featurewatch


def test_public_names_are_locked() -> None:
    assert sorted(featurewatch.__all__) == [
        "Alert", "BaseSink", "DetectorSpec", "FeatureWatchError", "GenerationBlocked", "GenerationResult",
        "Intervention", "Monitor", "RunResult", "SparseAutoencoder", "load_pack",
    ]
    for name in featurewatch.__all__:
        assert getattr(featurewatch, name) is not None


def test_importing_changes_nothing_global() -> None:
    code = ("import sys, torch, logging; before = (sys.excepthook, torch.nn.Module.__call__, "
            "len(logging.root.handlers)); import featurewatch, featurewatch.cli, featurewatch.integrations; "
            "after = (sys.excepthook, torch.nn.Module.__call__, len(logging.root.handlers)); "
            "assert before == after, (before, after); "
            "assert 'prometheus_client' not in sys.modules and 'langchain_core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_langchain_is_imported_only_by_its_integration() -> None:
    code = ("import sys, featurewatch; featurewatch.Monitor; featurewatch.GenerationBlocked; "
            "assert 'langchain_core' not in sys.modules; "
            "import featurewatch.integrations.langchain; assert 'langchain_core' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light_until_a_name_is_used() -> None:
    code = ("import sys, featurewatch; assert 'torch' not in sys.modules; "
            "featurewatch.Monitor; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_package_ships_in_the_wheel() -> None:
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "featurewatch").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
