import sys

from veil_cli.main import main

sys.exit(main())
