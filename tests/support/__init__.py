"""What the tests share: fake remote services, real servers started on 127.0.0.1, a pausable TCP proxy."""
