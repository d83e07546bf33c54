"""Build hooks only (the project is described in pyproject.toml): install ``textenv-gym-hook.pth`` beside the
packages, in regular and in editable installs, so ``gym.make("textenv/...")`` works without importing textenv first
(see textenv_gym_hook.py)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "textenv-gym-hook.pth"
PTH_LINE = "import textenv_gym_hook\n"
HOOK = Path(__file__).parent / "textenv_gym_hook.py"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            Path(self.build_lib, PTH).write_text(PTH_LINE)


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        # The hook module is copied (not linked): it is tiny, and the .pth runs before editable finders do.
        Path(unpacked_wheel, PTH).write_text(PTH_LINE)
        Path(unpacked_wheel, HOOK.name).write_text(HOOK.read_text())
        return files, mapping


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
