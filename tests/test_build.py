"""The native build refuses, with a clear message, a toolchain it cannot build the ops with."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CMAKE = Path(sys.executable).with_name("cmake")


def configure(tmp_path, **env):
    """Run only CMake's configure step of the project's build, as pip install would."""
    return subprocess.run([str(CMAKE), "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
                           f"-DPython_EXECUTABLE={sys.executable}", "-DSKBUILD_PROJECT_VERSION=0.0.0"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not CMAKE.exists() or shutil.which("g++") is None, reason="needs cmake and g++")
def test_build_without_openmp_fails_with_a_clear_message(tmp_path):
    # A compiler that works but rejects -fopenmp, as a compiler without OpenMP support does.
    compiler = tmp_path / "cxx-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *openmp*) echo "no OpenMP" >&2; exit 1;; '
                        'esac; done\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    result = configure(tmp_path, CXX=str(compiler))
    assert result.returncode != 0
    assert "transip: no OpenMP support found for the C++ compiler" in result.stdout + result.stderr


@pytest.mark.skipif(not CMAKE.exists(), reason="needs cmake")
def test_build_without_a_compiler_fails_with_a_clear_message(tmp_path):
    result = configure(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode != 0
    assert "CMAKE_CXX_COMPILER" in result.stdout + result.stderr
