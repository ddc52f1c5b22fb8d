//! The key-value conformance suite on the memory provider's store.

eventbroker_testkit::keyvalue_conformance!(memory, async {
    Some(eventbroker_testkit::backends::memory())
});
