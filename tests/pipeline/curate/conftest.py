"""The scored sweep output every curate test reads (made once, without Ray)."""

from __future__ import annotations

import pytest

from tests.support.scored import make_output


@pytest.fixture(scope="package")
def scored(tiny_vp, tiny_vp_dir, tiny_clip_dir, tiny_aesthetic_path, tmp_path_factory):
    return make_output(tmp_path_factory.mktemp("scored"), tiny_vp, tiny_vp_dir, tiny_clip_dir,
                       tiny_aesthetic_path)
