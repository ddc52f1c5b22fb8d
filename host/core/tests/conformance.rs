//! The provider conformance suite on the memory provider.

eventbroker_testkit::conformance!(memory, async {
    Some(eventbroker_testkit::backends::memory())
});
