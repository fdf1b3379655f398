import os
import sys
import traceback

from .run import main

if __name__ == "__main__":
    if "--stage" not in sys.argv:
        report = main()
        sys.exit(0 if report["result"] == "passed" else 1)
    # one stage: its result file is written; skip interpreter finalisation, where a torch.distributed
    # process group (ZeRO-3's) can hang the exit after a good run
    try:
        main()
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
