"""Print one line naming this machine's CPU, its SIMD/matrix features and torch's CPU kernel libraries.

Called by .ci/run before the tests, so that a failure names the hardware it happened on: float reduction order,
and with it anything that goes through PGD's sign(), depends on which kernels oneDNN/MKL pick for this CPU.
"""
from robustsparse.runs.machine import machine_line

if __name__ == "__main__":
    print(machine_line())
