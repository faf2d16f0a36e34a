"""Build hook only: metadata lives in setup.cfg.

The man page man/collectord.1 is generated from the real argparse parser
(collectord.cli.build_parser) by argparse-manpage during build_py, and installed
as a data file into <prefix>/share/man/man1 (setup.cfg [options.data_files]),
where `man` finds a venv's or a prefix's pages.
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

try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheel(editable_wheel):
        """`pip install -e .` with the man page: setuptools' editable wheel leaves
        data_files out (it asks the distribution for has_data(), which is called
        has_data_files()), so `man collectord` would find nothing in the venv.
        install_data puts them in the wheel's .data/data, which pip installs under
        sys.prefix; run_command runs it once, so a fixed setuptools is unaffected."""

        def _run_build_commands(self, *args, **kwargs):
            result = super()._run_build_commands(*args, **kwargs)
            if self.distribution.has_data_files():
                self.run_command("install_data")
            return result

    CMDCLASS["editable_wheel"] = EditableWheel
except ImportError:  # setuptools < 64: no PEP 660 editable installs at all
    pass

setup(cmdclass=CMDCLASS)
