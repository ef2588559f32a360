import sys

from vilms.cli import main

sys.exit(main())
