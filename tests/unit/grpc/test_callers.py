"""CALLER_TOKENS_FILE's format and the token lookup: `name scope token` lines, comments, blank
lines; every mistake one line naming the line (and the caller when its name is sound), never a token."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from stigg_sidecar.grpc.callers import Caller, CallerTokensError, parse_callers

TOKEN_A = "a" * 16 + "-secret-a"
TOKEN_B = "b" * 16 + "-secret-b"


class ParseTests(SynchronousTestCase):
    def error(self, text: str) -> str:
        with self.assertRaises(CallerTokensError) as raised:
            parse_callers(text, "/etc/tokens")
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        for token in (TOKEN_A, TOKEN_B, "t0osh0rt"):
            self.assertNotIn(token, message)
        return message

    def test_names_scopes_comments_and_blank_lines(self):
        table = parse_callers(f"# who\n\n  app read {TOKEN_A}  \n\tbilling\twrite\t{TOKEN_B}\n   # indented comment\n", "f")
        self.assertEqual(table.find(TOKEN_A), Caller("app", "read"))
        self.assertEqual(table.find(TOKEN_B), Caller("billing", "write"))
        reader, writer = table.find(TOKEN_A), table.find(TOKEN_B)
        assert reader is not None and writer is not None
        self.assertTrue(writer.may_write)
        self.assertFalse(reader.may_write)
        self.assertIsNone(table.find(TOKEN_A[:-1]))
        self.assertIsNone(table.find(""))
        self.assertEqual(table.describe(), "app (read), billing (write)")
        self.assertNotIn(TOKEN_A, repr(table))

    def test_mistakes(self):
        self.assertEqual(
            self.error(f"app read {TOKEN_A} extra"),
            "CALLER_TOKENS_FILE: /etc/tokens line 1: expected 'name scope token' (3 fields), got 4",
        )
        self.assertEqual(
            self.error(f"# x\napp {TOKEN_A}"),
            "CALLER_TOKENS_FILE: /etc/tokens line 2: expected 'name scope token' (3 fields), got 2",
        )
        self.assertEqual(
            self.error(f"app admin {TOKEN_A}"),
            "CALLER_TOKENS_FILE: /etc/tokens line 1 (caller app): the scope must be read or write",
        )
        # The token first by mistake: the name is refused without being quoted.
        self.assertIn("the name must be 1-64 letters", self.error(f"{TOKEN_A}/x read app"))
        self.assertEqual(
            self.error("app read t0osh0rt"),
            "CALLER_TOKENS_FILE: /etc/tokens line 1 (caller app): the token is shorter than 16 characters",
        )
        self.assertEqual(
            self.error(f"app read {TOKEN_A}\napp write {TOKEN_B}"),
            "CALLER_TOKENS_FILE: /etc/tokens line 2: caller app appears twice",
        )
        self.assertEqual(
            self.error(f"app read {TOKEN_A}\nother write {TOKEN_A}"),
            "CALLER_TOKENS_FILE: /etc/tokens line 2 (caller other): the same token is given to another caller",
        )
        self.assertEqual(
            self.error("# nobody\n\n"), "CALLER_TOKENS_FILE: /etc/tokens has no callers (every call would be refused)"
        )
