import pytest

pytest.importorskip("transformers", reason="needs transformers (requirements/dev.txt)")
