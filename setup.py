"""Build hook only: metadata lives in setup.cfg.

The man page man/collectord.1 is generated from the real argparse parser
(collectord.cli.build_parser) by argparse-manpage during build_py.
"""
from setuptools import setup

try:
    from build_manpages import build_manpages, get_build_py_cmd, get_install_cmd
    from setuptools.command.build_py import build_py
    from setuptools.command.install import install

    CMDCLASS = {
        "build_manpages": build_manpages,
        "build_py": get_build_py_cmd(build_py),
        "install": get_install_cmd(install),
    }
except ImportError:  # argparse-manpage missing: install still works, without the man page
    CMDCLASS = {}

setup(cmdclass=CMDCLASS)
