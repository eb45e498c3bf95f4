"""`python -m dsv32.server.launch_server ...`: same as `dsv32 serve ...` (SGLang's module path, our flags)."""

import sys

from dsv32.server.serve import main

if __name__ == "__main__":
    sys.exit(main())
