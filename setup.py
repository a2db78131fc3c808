"""Only here to ship `peft_lalora_hint.pth`; metadata lives in setup.cfg.

The .pth file runs `import _peft_lalora_hint` at interpreter start: a tiny module (no torch, no peft) that
makes loading an LALORA adapter in a process that never imported peft_lalora fail with a clear message
instead of peft's bare `KeyError('LALORA')`.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft_lalora_hint.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithPth})
