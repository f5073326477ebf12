import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the command line itself loads
    print("framepack: interrupted.", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
