import core


def test_package_imports():
    assert core.__version__
