"""`python -m userstudy.serve SITE --db answers.sqlite ...`: see `userstudy.server`."""

from userstudy.server import main

if __name__ == "__main__":
    raise SystemExit(main())
