import sys

from pyvduse.cli.main import main

sys.exit(main())
